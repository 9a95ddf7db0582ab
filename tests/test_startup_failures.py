"""Startup failures a user can cause end with one line on the worker's output that says what to change, and
exit code 2; never a traceback. A second worker on a host with default flags is one of them: the metrics port is
taken, and a worker that moved to another port by itself would leave Prometheus and the orchestrator's probes
looking at the first one (deploy/README.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaq.worker.embedded_valkey import free_port

from .conftest import worker_process
from .private_server import embedded_valkey_binary, private_server

pytestmark = pytest.mark.slow


def start_worker(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `llamaq worker` with these flags until it exits; its exit code and everything it wrote."""
    command = [sys.executable, "-m", "llamaq.worker.cli", "worker", "--threads", "1", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return done.returncode, done.stdout + done.stderr


def assert_one_clear_line(code: int, output: str, *words: str) -> None:
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, (code, output)
    assert lines[0].startswith("llamaq worker: ") and all(word in lines[0] for word in words), lines[0]


async def test_a_second_worker_on_the_host_with_default_flags_names_the_flag(redis_url: str, prefix: str) -> None:
    # The default port, moved off 9464 through the variable the flag's default reads, so that whatever else
    # this machine runs on 9464 does not matter.
    port = str(free_port())
    env = {"LLAMAQ_METRICS_PORT": port}
    with worker_process(redis_url, prefix, metrics_port=None, env=env) as first:
        code, output = await asyncio.to_thread(start_worker, "--redis-url", redis_url, "--prefix", prefix, env=env)
        assert first.poll() is None, "the first worker serves on"
    assert_one_clear_line(code, output, f"metrics port {port}", "--metrics-port")


@pytest.mark.parametrize(
    "case",
    ["missing model", "not a model", "unreachable Redis", "wrong Redis password", "unusable state dir", "bad host"],
)
async def test_a_startup_failure_is_one_line_naming_the_flag(
    case: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    flags, words = {
        "missing model": (["--model", str(tmp_path / "missing.gguf")], ["--model", "No such file"]),
        "not a model": (["--model", str(not_a_model)], ["not a GGUF", "--model"]),
        "unreachable Redis": (["--redis-url", f"redis://127.0.0.1:{free_port()}/0"], ["cannot reach", "--redis-url"]),
        "wrong Redis password": ([], ["refused the credentials", "--redis-url"]),
        "unusable state dir": (["--state-dir", str(not_a_model / "states")], ["--state-dir"]),
        "bad host": (["--metrics-host", "256.0.0.1"], ["--metrics-host"]),
    }[case]
    if "--metrics-host" not in flags:
        flags += ["--metrics-port", "0"]
    with contextlib.ExitStack() as stack:
        if case == "wrong Redis password":
            port = free_port()
            ping = f"redis://:right-password@127.0.0.1:{port}/0"
            binary = embedded_valkey_binary()
            stack.enter_context(
                private_server(binary, "--port", str(port), "--requirepass", "right-password", ping_url=ping)
            )
            flags += ["--redis-url", f"redis://:wrong-password@127.0.0.1:{port}/0"]
        elif "--redis-url" not in flags:
            flags += ["--redis-url", redis_url]
        code, output = await asyncio.to_thread(start_worker, "--prefix", prefix, *flags)
    assert_one_clear_line(code, output, *words)
    assert "wrong-password" not in output, "the password is masked"
