"""The four systems of the throughput comparison, each serving the same chat requests to the same client load:
llamaq through Redis, llamaq's engine in-process, llama-cpp-python's `Llama` one request at a time, and
llama-server. Same model, per-sequence context, thread count, attention and KV type for all."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaq.protocol import ChatMessage

from .bench_clients import HTTP, REDIS, client_jobs, run_client_processes
from .bench_cpu import local_server_pid, thread_cpu_s
from .bench_engine import EngineDriver, chat_request
from .bench_http import llama_server
from .bench_load import Trace, chat_messages, request_index
from .bench_process import dying_with_parent
from .bench_thread import on_own_thread
from .engine import Engine, EngineConfig
from .process_log import wait_for_line
from .service import READY_LINE

CELLS_PER_SEQUENCE = 512
"""KV cells each sequence (slot) gets in every system: n_ctx = parallel * this, as llama-server's -c / -np."""
N_BATCH = 512
_WARM_UP_TIMEOUT_S = 120.0
_SLOWEST_TOKENS_PER_S = 10.0
"""A run slower than this has gone wrong (a machine thrashing under other work) and is given up."""

REDIS_PATH = "llamaq via Redis"
ENGINE = "llamaq engine in-process"
LLAMA_SERIAL = "Llama one at a time"
LLAMA_SERVER = "llama-server"
SYSTEMS = {"redis": REDIS_PATH, "engine": ENGINE, "llama": LLAMA_SERIAL, "llama-server": LLAMA_SERVER}
"""Short names (for --systems) of the systems compared."""


Measured = tuple[list[Trace], dict[str, float]]
"""A run's traces and what else was measured alongside (CPU seconds by part)."""


@dataclass(frozen=True)
class Load:
    """One measurement's client load and the settings every system shares."""

    clients: int
    requests_per_client: int
    max_tokens: int
    threads: int
    model: Path
    max_client_processes: int = 8

    @property
    def n_requests(self) -> int:
        """Requests in the run."""
        return self.clients * self.requests_per_client

    @property
    def timeout_s(self) -> float:
        """How long the run may take before it counts as failed."""
        return _WARM_UP_TIMEOUT_S + self.n_requests * self.max_tokens / _SLOWEST_TOKENS_PER_S


def prompt_tokens(model: Path, n_requests: int) -> dict[int, list[int]]:
    """Every request's chat rendered by our chat template and tokenized, for the peers that take token lists."""
    engine = Engine(EngineConfig(model, n_ctx=CELLS_PER_SEQUENCE, n_seq_max=1, n_threads=1))
    try:
        return {
            i: engine.chat_tokens([ChatMessage(m["role"], m["content"]) for m in chat_messages(i)])
            for i in range(n_requests)
        }
    finally:
        engine.close()


@contextlib.contextmanager
def worker_process(
    url: str,
    prefix: str,
    parallel: int,
    n_ctx: int,
    threads: int,
    log_path: Path,
    n_batch: int = N_BATCH,
    launcher: tuple[str, ...] = ("-m", "llamaq.worker.cli"),
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker in its own process, started with the `llamaq worker` command line, stopped gracefully after.

    `launcher` is what python runs with that command line (a probe wrapping the CLI, for one).
    """
    command = [sys.executable, *launcher, "worker", "--redis-url", url, "--prefix", prefix]
    command += ["--parallel", str(parallel), "--n-ctx", str(n_ctx), "--n-batch", str(n_batch)]
    # Metrics stay on, as deployed, but on a free port: a test run or another worker may hold the default one.
    command += ["--threads", str(threads), "--metrics-port", "0"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            dying_with_parent(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for_line(process, log_path, READY_LINE, 120)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_redis(url: str, load: Load, work_dir: Path) -> Measured:
    """llamaq through Redis: a worker process, clients in their own processes; plus where the CPU went."""
    prefix = f"bench{secrets.token_hex(4)}"
    n_ctx = load.clients * CELLS_PER_SEQUENCE
    valkey = local_server_pid(url)
    log_path = work_dir / f"worker-{load.clients}-{prefix}.log"  # one per run: rounds repeat a client count
    with worker_process(url, prefix, load.clients, n_ctx, load.threads, log_path) as worker:
        # Warm-up outside the timing: the model's pages, the consumer group, the template prefix in the cache.
        run_client_processes(client_jobs(REDIS, url, 1, 1, 4, 1, prefix), _WARM_UP_TIMEOUT_S)
        jobs = client_jobs(
            REDIS, url, load.clients, load.requests_per_client, load.max_tokens, load.max_client_processes, prefix
        )
        loop_before, engine_before = thread_cpu_s(worker.pid)
        valkey_before = sum(thread_cpu_s(valkey)) if valkey else 0.0
        run = run_client_processes(jobs, load.timeout_s)
        loop_after, engine_after = thread_cpu_s(worker.pid)
        valkey_after = sum(thread_cpu_s(valkey)) if valkey else 0.0
    # The worker's main thread runs its event loop (intake, publisher, metrics); the others are the engine
    # thread and llama.cpp's own threads.
    return run.traces, {
        "cpu_s_clients": round(run.cpu_s, 2),
        "cpu_s_valkey": round(valkey_after - valkey_before, 2),
        "cpu_s_worker_event_loop": round(loop_after - loop_before, 2),
        "cpu_s_worker_engine": round(engine_after - engine_before, 2),
    }


def run_engine(load: Load) -> Measured:
    """llamaq's engine in this process, no Redis: the ceiling for the Redis path."""
    config = EngineConfig(
        load.model,
        n_ctx=load.clients * CELLS_PER_SEQUENCE,
        n_seq_max=load.clients,
        n_batch=N_BATCH,
        n_threads=load.threads,
    )
    engine = Engine(config)
    try:
        with EngineDriver(engine, N_BATCH) as driver:
            driver.run(1, 1, chat_request(4), _WARM_UP_TIMEOUT_S)
            cpu_before = sum(os.times()[:2])
            traces = driver.run(load.clients, load.requests_per_client, chat_request(load.max_tokens), load.timeout_s)
            return traces, {"cpu_s_process": round(sum(os.times()[:2]) - cpu_before, 2)}
    finally:
        engine.close()


def new_llama(load: Load) -> Any:
    """llama-cpp-python's high-level Llama with our attention and KV recipe (flash attention, Q8_0 K and V)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(load.model),
        n_ctx=CELLS_PER_SEQUENCE,
        n_batch=N_BATCH,
        n_threads=load.threads,
        n_threads_batch=load.threads,
        flash_attn=True,
        type_k=llama_cpp.GGML_TYPE_Q8_0,
        type_v=llama_cpp.GGML_TYPE_Q8_0,
        verbose=False,
    )


def run_llama_serial(llama: Any, prompts: dict[int, list[int]], load: Load) -> Measured:
    """`Llama.create_completion` on our rendered prompt tokens, one request at a time in arrival order.

    Every user sends its first request at the start and its next one when the previous answer ends, as against
    the other systems; time to first token counts the wait in that queue, so it is honest for a serial server.
    Runs on a thread of its own, as the engine does (bench_thread says why).
    """
    return on_own_thread(lambda: _serve_serially(llama, prompts, load), "llama-serial")


def _serve_serially(llama: Any, prompts: dict[int, list[int]], load: Load) -> Measured:
    _llama_request(llama, prompts[0], 4, Trace(-1, time.monotonic()))
    started = time.monotonic()
    queue: deque[tuple[int, int, float]] = deque((user, 0, started) for user in range(load.clients))
    traces = []
    while queue:
        user, turn, sent_at = queue.popleft()
        index = request_index(user, turn, load.requests_per_client)
        trace = Trace(index, sent_at)
        _llama_request(llama, prompts[index], load.max_tokens, trace)
        traces.append(trace)
        if turn + 1 < load.requests_per_client and trace.done_at is not None:
            queue.append((user, turn + 1, trace.done_at))
    return traces, {}


def _llama_request(llama: Any, tokens: list[int], max_tokens: int, trace: Trace) -> None:
    finish = None
    for chunk in llama.create_completion(
        tokens, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=True
    ):
        choice = chunk["choices"][0]
        if choice["text"]:
            trace.token_times.append(time.monotonic())
        finish = choice["finish_reason"] or finish
    trace.done_at = time.monotonic()
    # The stream reports no usage. Every generated token but the last is fed back, so the context grew by the
    # prompt plus the answer, less one token when the limit stopped it (an end-of-generation token is not kept).
    trace.n_tokens = llama.n_tokens - len(tokens) + (1 if finish == "length" else 0)


def run_llama_server(binary: Path, prompts: dict[int, list[int]], load: Load, work_dir: Path) -> Measured:
    """llama-server with one slot per client, driven over HTTP by the same client processes."""
    log_path = work_dir / f"llama-server-{load.clients}-{secrets.token_hex(3)}.log"
    n_ctx = load.clients * CELLS_PER_SEQUENCE
    with llama_server(binary, load.model, load.clients, n_ctx, load.threads, N_BATCH, log_path) as (host, port):
        address = f"{host}:{port}"
        run_client_processes(client_jobs(HTTP, address, 1, 1, 4, 1, prompts={0: prompts[0]}), _WARM_UP_TIMEOUT_S)
        jobs = client_jobs(
            HTTP,
            address,
            load.clients,
            load.requests_per_client,
            load.max_tokens,
            load.max_client_processes,
            prompts=prompts,
        )
        run = run_client_processes(jobs, load.timeout_s)
        return run.traces, {"cpu_s_clients": round(run.cpu_s, 2)}
