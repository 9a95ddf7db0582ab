"""Shared fixtures: a real Valkey server, the real model, and workers running in this process or in others."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from llamaq.protocol import (
    EVENT_FIELD,
    REQUEST_FIELD,
    Event,
    Keys,
    Request,
    RequestKind,
    SamplingParams,
    decode_event,
    encode_request,
)
from llamaq.worker.embedded_valkey import EmbeddedValkey
from llamaq.worker.model_files import default_model_path
from llamaq.worker.process_log import log_tail, wait_for_line
from llamaq.worker.service import READY_LINE, Worker
from llamaq.worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
FAILOVER_TTL_S = 4
"""--heartbeat-ttl of tests that wait for one worker to take over from another: a few seconds instead of ten, and
no less, since a loaded machine may delay a beat by a second or two."""


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """$REDIS_URL when set, else a private embedded Valkey for the whole session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedValkey() as valkey:
        yield valkey.url


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model, SmolLM2-135M-Instruct."""
    return default_model_path()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's streams."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    """Key names under this test's own prefix, on a queue other than the default one."""
    return Keys(prefix=prefix, queue="hand-played")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at the server directly."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def worker_settings(redis_url: str, model_path: Path, prefix: str, **overrides: object) -> WorkerSettings:
    """Settings for a small test worker: 4 sequences of 1024 cells each unless overridden."""
    base = WorkerSettings(
        redis_url=redis_url,
        model_path=model_path,
        n_ctx=4096,
        parallel=4,
        n_batch=256,
        prefix=prefix,
        threads=2,
        metrics_port=0,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings) -> AsyncIterator[Worker]:
    """A worker serving in this event loop (its engine on its own thread) until the block ends."""
    worker = Worker(settings, out=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        raise RuntimeError(f"worker stopped before it was ready: {task.result()!r}")
    try:
        yield worker
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, timeout=120) == 0


def assert_kv_cache_accounted(worker: Worker) -> None:
    """llama.cpp's own view of every sequence equals the manager's: running sequences hold the tokens they
    computed, idle ones the tokens parked with them, free ones nothing. No leaked cells."""
    loop = worker.engine_loop
    assert loop is not None
    with loop.engine.lock:
        expected = dict.fromkeys(range(loop.engine.n_seq_max), 0)
        expected.update(loop.kv.cells_held())
        for sequence in loop.scheduler.running:
            assert sequence.seq_id is not None
            expected[sequence.seq_id] = sequence.n_computed
        actual = {seq_id: loop.engine.sequence_length(seq_id) for seq_id in expected}
    assert actual == expected


def kv_cells_in_use(worker: Worker) -> int:
    """Cells llama.cpp itself reports for all sequences of a worker's context."""
    loop = worker.engine_loop
    assert loop is not None
    with loop.engine.lock:
        return sum(loop.engine.sequence_length(seq_id) for seq_id in range(loop.engine.n_seq_max))


async def wait_until_idle(worker: Worker, timeout_s: float = 30.0) -> None:
    """Wait until the worker holds no sequence (requests end asynchronously with their last event)."""
    loop = worker.engine_loop
    assert loop is not None
    deadline = asyncio.get_running_loop().time() + timeout_s
    while loop.kv.n_used or loop.scheduler.has_work:
        assert asyncio.get_running_loop().time() < deadline, "worker did not become idle"
        await asyncio.sleep(0.05)


WORKER_LOGS: dict[int, Path] = {}
"""Where each worker process started by `worker_process` writes its output, by pid."""


@contextlib.contextmanager
def worker_process(
    redis_url: str, prefix: str, *extra: str, metrics_port: str | None = "0", env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker in its own process, started with the real `llamaq worker` command line (metrics on a free port
    unless `metrics_port` says otherwise; None leaves the flag out, for the default).

    Its output goes to a file, never to a pipe: a pipe nobody reads after startup fills up, and the worker's next
    log line then blocks its event loop (no heartbeat, no replies) until it counts as dead.
    """
    command = [
        sys.executable,
        "-m",
        "llamaq.worker.cli",
        "worker",
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        "--n-ctx",
        "4096",
        "--parallel",
        "4",
        "--n-batch",
        "256",
        "--threads",
        "2",
        *(["--metrics-port", metrics_port] if metrics_port is not None else []),
        *extra,
    ]
    with tempfile.NamedTemporaryFile(prefix="llamaq-worker-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        )
    WORKER_LOGS[process.pid] = log_path
    try:
        wait_for_line(process, log_path, READY_LINE, 180)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        WORKER_LOGS.pop(process.pid, None)
        log_path.unlink(missing_ok=True)


def worker_output(process: subprocess.Popen[bytes], last_lines: int = 40) -> str:
    """The last lines a worker process started by `worker_process` wrote (for failure messages)."""
    path = WORKER_LOGS.get(process.pid)
    return "(no log)" if path is None else log_tail(path, last_lines)


def keys_for(prefix: str) -> Keys:
    """Key names under a test's prefix."""
    return Keys(prefix=prefix)


def worker_metrics_port(process: subprocess.Popen[bytes]) -> int:
    """The port a worker process started by `worker_process` serves /metrics on (it prints it when ready)."""
    path = WORKER_LOGS[process.pid]
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("metrics on http://"):
            return int(line.rsplit(":", 1)[1].split("/", 1)[0])
    raise AssertionError(f"worker {process.pid} printed no metrics address:\n{worker_output(process)}")


def scrape_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample a metrics server on loopback exposes, by name and labels (without `model`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model"))
            samples[(sample.name, labels)] = sample.value
    return samples


def hand_made_request(client_id: str, request_id: str, prompt: str, max_tokens: int = 16, **fields: Any) -> Request:
    """A greedy completion request with ids the test chose, as a client of another language would write it."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(
        id=request_id, client_id=client_id, kind=RequestKind.COMPLETION, prompt=prompt, params=params, **fields
    )


async def enqueue_by_hand(redis: aioredis.Redis, keys: Keys, request: Request, stream: str | None = None) -> bytes:
    """XADD a request entry straight to the request stream (or another stream, an inbox); its entry id."""
    entry_id: bytes = await redis.xadd(stream or keys.requests, {REQUEST_FIELD: encode_request(request, keys)})
    return entry_id


async def reply_events(redis: aioredis.Redis, reply_key: str) -> list[Event]:
    """Every event on a reply stream, read without consuming it (as a second reader would)."""
    entries: Any = await redis.xrange(reply_key)
    return [decode_event(fields[EVENT_FIELD]) for _, fields in entries]
