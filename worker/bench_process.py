"""Child processes of the benchmark (worker, llama-server, clients) end with it, even when it is killed: a worker
left behind would keep decoding on the machine the next measurement runs on."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1

# Runs in the child before it becomes the real program: the death signal survives exec (not for setuid ones).
_LAUNCHER = (
    "import os, sys\n"
    "from llamaq.worker.bench_process import die_with_parent\n"
    "die_with_parent()\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def dying_with_parent(command: list[str]) -> list[str]:
    """The command run through a launcher that has the kernel send it SIGTERM when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _LAUNCHER, *command]


def die_with_parent() -> None:
    """Have the kernel send this (child) process SIGTERM when its parent dies; Linux only, else nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
