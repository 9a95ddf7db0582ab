"""Child processes whose output goes to a log file, not a pipe: a pipe nobody reads after startup fills up, and
the child's next write then blocks it. Wait for the line a child prints when ready, and read the log's tail."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_line(process: subprocess.Popen[bytes], log_path: Path, line: str, timeout_s: float) -> None:
    """Return once the process has written `line` (a whole line) to its log; RuntimeError if it exits or times out
    first, with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while line not in log_path.read_text(errors="replace").splitlines():
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited ({process.returncode}) before it printed {line!r}:\n{log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {line!r} after {timeout_s:.0f} s:\n{log_tail(log_path)}")
        time.sleep(0.1)


def log_tail(log_path: Path, last_lines: int = 40) -> str:
    """The last lines of a log file ("(no log)" when it is gone)."""
    if not log_path.exists():
        return "(no log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-last_lines:])
