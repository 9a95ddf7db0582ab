"""Foreign CPU: how much of the machine other programs used while a measurement ran. On a shared machine a
benchmark row is only worth comparing when that share is small, so rows record it, and runs wait for quiet."""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class CpuSnapshot:
    """Seconds of CPU the whole machine and this process tree had used, at one moment."""

    at: float
    machine_busy_s: float
    ours_s: float


def snapshot() -> CpuSnapshot | None:
    """The machine's busy CPU time and ours (this process, its live descendants, its reaped children)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    ours = own.user + own.system + own.children_user + own.children_system
    psutil: Any = importlib.import_module("psutil")
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            ours += times.user + times.system + times.children_user + times.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return CpuSnapshot(time.monotonic(), machine, ours)


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread and of all its other threads together (0, 0 once it is gone)."""
    psutil: Any = importlib.import_module("psutil")
    main = others = 0.0
    try:
        for thread in psutil.Process(pid).threads():
            if thread.id == pid:
                main += thread.user_time + thread.system_time
            else:
                others += thread.user_time + thread.system_time
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return main, others


def local_server_pid(url: str | None, name: str = "valkey-server") -> int | None:
    """The pid of our own child server behind a redis:// URL on loopback (an embedded Valkey), if there is one."""
    if not url:
        return None
    port = url.rsplit(":", 1)[-1].split("/", 1)[0]
    psutil: Any = importlib.import_module("psutil")
    for child in psutil.Process().children(recursive=True):
        try:
            if name in child.name() and any(port in arg for arg in child.cmdline()):
                return int(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def foreign_share(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Share of the machine's CPU capacity (all cores) used by other programs between two snapshots."""
    if before is None or after is None or after.at <= before.at:
        return None
    capacity = (after.at - before.at) * (os.cpu_count() or 1)
    other = (after.machine_busy_s - before.machine_busy_s) - (after.ours_s - before.ours_s)
    return round(max(other, 0.0) / capacity, 3)


def wait_for_quiet(max_share: float, max_wait_s: float, window_s: float = 3.0) -> float | None:
    """Wait until other programs use at most max_share of the CPU over a window (or max_wait_s passed)."""
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    while True:
        before = snapshot()
        time.sleep(window_s)
        share = foreign_share(before, snapshot())
        if share is None or share <= max_share or time.monotonic() >= deadline:
            return share


def measured_quietly(
    run: Callable[[], T], max_share: float, attempts: int, max_wait_s: float
) -> tuple[T, float | None, int]:
    """Run a measurement, again (after waiting for quiet) while others used more than max_share of the CPU;
    the result with the least foreign CPU, that share, and the attempts made."""
    best: tuple[T, float | None] | None = None
    made = 0
    while made < attempts:
        made += 1
        wait_for_quiet(max_share, max_wait_s)
        before = snapshot()
        result = run()
        share = foreign_share(before, snapshot())
        if best is None or (share is not None and (best[1] is None or share < best[1])):
            best = (result, share)
        if share is None or share <= max_share:
            break
    assert best is not None
    return best[0], best[1], made
