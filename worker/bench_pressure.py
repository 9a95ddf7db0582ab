"""Pressure: many requests from several client processes arriving at once on one worker process. Measures the
time until the last answer, latency percentiles, failures, and the worker's resident memory at rest and at peak."""

from __future__ import annotations

import importlib
import secrets
import threading
from pathlib import Path
from typing import Any

from .bench_clients import REDIS, client_jobs, run_client_processes
from .bench_load import percentile, summarize
from .bench_systems import CELLS_PER_SEQUENCE, worker_process

_MIB = 1 << 20


class RssWatch:
    """Polls a process's resident set size on a thread; `peak` is the largest seen."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        psutil: Any = importlib.import_module("psutil")
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def rss(self) -> int:
        """Resident bytes now."""
        rss: int = self._process.memory_info().rss
        return rss

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self.rss())


def high_water_mark(pid: int) -> int | None:
    """The kernel's own peak RSS of a process (VmHWM, Linux), in bytes; None where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_pressure(
    url: str,
    model: Path,
    threads: int,
    n_requests: int,
    n_processes: int,
    max_tokens: int,
    parallel: int,
    work_dir: Path,
) -> dict[str, Any]:
    """n_requests requests, one per simulated user, from n_processes client processes, all sent at once."""
    prefix = f"bpress{secrets.token_hex(3)}"
    n_ctx = parallel * CELLS_PER_SEQUENCE
    with worker_process(url, prefix, parallel, n_ctx, threads, work_dir / "worker-pressure.log") as process:
        run_client_processes(client_jobs(REDIS, url, 1, 1, 4, 1, prefix), 600)
        jobs = client_jobs(REDIS, url, n_requests, 1, max_tokens, n_processes, prefix)
        with RssWatch(process.pid) as watch:
            rss_idle = watch.rss()
            traces = run_client_processes(jobs, 3600).traces
        hwm = high_water_mark(process.pid)
    summary = summarize(traces)
    e2e = [(t.done_at - t.sent_at) for t in traces if t.done_at is not None]
    return {
        "requests": n_requests,
        "client_processes": len(jobs),
        "max_tokens": max_tokens,
        "parallel": parallel,
        "n_ctx": n_ctx,
        "completed": int(summary["requests"] - summary["errors"]),
        "failed": int(summary["errors"]),
        "completion_s": summary.get("wall_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "ttft_ms_p50": summary.get("ttft_ms_p50"),
        "ttft_ms_p95": summary.get("ttft_ms_p95"),
        "e2e_s_p50": round(percentile(e2e, 50), 2),
        "e2e_s_max": round(max(e2e), 2) if e2e else None,
        "worker_rss_mib_idle": round(rss_idle / _MIB, 1),
        "worker_rss_mib_peak": round(watch.peak / _MIB, 1),
        "worker_vm_hwm_mib": None if hwm is None else round(hwm / _MIB, 1),
        "errors": sorted({t.error for t in traces if t.error})[:5],
    }
