"""`make demo`: an embedded Valkey, one worker process, and a simulated multi-user chat against them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from .embedded_valkey import EmbeddedValkey
from .service import READY_LINE


def run_demo(users: int, turns: int, max_tokens: int, worker_args: list[str]) -> int:
    """Run the demo end to end; exit code 0 only if every request succeeded and the worker stopped cleanly."""
    from llamaq.client.demo_chat import run_demo as run_chat_demo

    with EmbeddedValkey() as valkey:
        print(f"embedded Valkey at {valkey.url}", flush=True)
        with _worker_process(valkey.url, worker_args) as worker:
            summary = asyncio.run(run_chat_demo(valkey.url, users=users, turns=turns, max_tokens=max_tokens))
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=120)
        print(f"worker exited with code {code}", flush=True)
    return 0 if code == 0 and summary.errors == 0 else 1


@contextlib.contextmanager
def _worker_process(url: str, worker_args: list[str]) -> Iterator[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "llamaq.worker.cli", "worker", "--redis-url", url, *worker_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_ready(process, timeout_s=300)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen[str], timeout_s: float) -> None:
    """Echo the worker's output until it is ready, then keep draining it on a thread so it never blocks."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        print(f"[worker] {line.rstrip()}", flush=True)
        if line.strip() == READY_LINE:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not become ready in time")
    else:
        raise RuntimeError(f"the worker exited before it was ready (code {process.wait()})")
    stream = process.stdout

    def drain() -> None:
        for line in stream:
            print(f"[worker] {line.rstrip()}", flush=True)

    threading.Thread(target=drain, daemon=True).start()
