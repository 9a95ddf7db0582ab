"""A worker process that counts its own Redis round trips, for the benchmark's round-trip section.

Runs `llamaq worker` (the same CLI) after wrapping redis-py's asyncio `send_packed_command`, which every round
trip goes through once: a single command, or a whole pipeline. Each is counted under its first command's name
(the publisher's step pipeline starts with XADD, intake's read is XREADGROUP) and the counts are written as JSON
to a file every 0.2 s, so the benchmark can take them before and after a run without stopping the worker.

Usage: python -m llamaq.worker.bench_rtt COUNTS.json worker [llamaq worker flags]
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

_WRITE_INTERVAL_S = 0.2


def install(path: Path) -> Counter[str]:
    """Count every round trip of this process by first command; written to path until the process ends."""
    from redis.asyncio.connection import AbstractConnection

    counts: Counter[str] = Counter()
    original = AbstractConnection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counts[first_command(command)] += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]

    def write() -> None:
        while True:
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(dict(counts)))
            os.replace(temporary, path)
            threading.Event().wait(_WRITE_INTERVAL_S)

    threading.Thread(target=write, name="rtt-counts", daemon=True).start()
    return counts


def first_command(packed: Any) -> str:
    """The name of the first command in a packed RESP request (bytes, str or a list of chunks)."""
    if isinstance(packed, str):
        packed = packed.encode()
    if not isinstance(packed, bytes | bytearray | memoryview):
        chunks = list(packed)
        packed = bytes(chunks[0]) if chunks else b""
    # "*<n>\r\n$<len>\r\n<NAME>\r\n..."
    parts = bytes(packed[:64]).split(b"\r\n")
    return parts[2].decode(errors="replace").upper() if len(parts) > 2 else "?"


def read_counts(path: Path) -> Counter[str]:
    """The counts the probe last wrote (empty before its first write)."""
    try:
        return Counter({k: int(v) for k, v in json.loads(path.read_text()).items()})
    except (OSError, ValueError):
        return Counter()


def main(argv: list[str]) -> int:
    """Install the probe, then run the llamaq CLI with the rest of the arguments."""
    install(Path(argv[0]))
    from .cli import main as cli_main

    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
