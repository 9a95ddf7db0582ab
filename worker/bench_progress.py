"""A one-line progress bar on stderr for `llamaq bench`: steps done, the step running, time so far."""

from __future__ import annotations

import sys
import time


class Progress:
    """Redrawn in place on a terminal; one line per step in a log."""

    def __init__(self, total: int, width: int = 24) -> None:
        self._total = max(total, 1)
        self._done = 0
        self._width = width
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        """Show that the step `label` starts (the previous one is done)."""
        self._draw(label)
        self._done = min(self._done + 1, self._total)

    def close(self) -> None:
        """Finish the bar."""
        self._done = self._total
        self._draw("done")
        if self._tty:
            sys.stderr.write("\n")

    def _draw(self, label: str) -> None:
        filled = self._width * self._done // self._total
        bar = "#" * filled + "-" * (self._width - filled)
        elapsed = int(time.monotonic() - self._started)
        line = f"[{bar}] {self._done}/{self._total} {elapsed // 60}m{elapsed % 60:02d}s {label}"
        sys.stderr.write(f"\r\x1b[2K{line}" if self._tty else line + "\n")
        sys.stderr.flush()
