"""Client load in separate processes: each process runs some users, every user sends its requests one after the
other (closed loop) and records when each token arrived. The same load drives llamaq through Redis and
llama-server over HTTP. Imports no llama.cpp: these processes are only clients."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bench_http import stream_completion
from .bench_load import Trace, chat_messages, request_index, split_users
from .bench_process import die_with_parent

REDIS = "redis"
HTTP = "http"
_SETUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ClientJob:
    """What one client process does: its users, their requests, and where to send them."""

    target: str
    """REDIS (llamaq's Client) or HTTP (llama-server's /completion)."""
    address: str
    """A redis:// URL, or host:port."""
    users: tuple[int, ...]
    requests_per_user: int
    max_tokens: int
    prefix: str = "llamaq"
    prompts: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """HTTP only: (request index, chat prompt tokens rendered by our template)."""


@dataclass
class ClientRun:
    """What the client processes of one run saw, and the CPU they spent from the common start to their end."""

    traces: list[Trace] = field(default_factory=list)
    cpu_s: float = 0.0


def run_client_processes(
    jobs: Sequence[Any], timeout_s: float, body: Callable[[Any, Any, Any], None] | None = None
) -> ClientRun:
    """Start one process per job, release them together once all are connected, and gather their traces.

    `body(job, barrier, results)` runs in each process (default: closed-loop users, client_process); it waits
    on the barrier once connected and puts (traces, CPU seconds) or an error string on results.
    """
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(jobs) + 1)
    results: multiprocessing.Queue[tuple[list[Trace], float] | str] = context.Queue()
    target = body or client_process
    processes = [context.Process(target=target, args=(job, barrier, results), daemon=True) for job in jobs]
    for process in processes:
        process.start()
    run = ClientRun()
    try:
        barrier.wait(timeout=_SETUP_TIMEOUT_S)
        for _ in jobs:
            outcome = results.get(timeout=timeout_s)
            if isinstance(outcome, str):
                raise RuntimeError(f"a client process failed: {outcome}")
            run.traces += outcome[0]
            run.cpu_s += outcome[1]
    except (queue.Empty, threading.BrokenBarrierError) as exc:
        raise RuntimeError(f"client processes did not finish in time ({type(exc).__name__})") from exc
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return run


def client_process(job: ClientJob, barrier: Any, results: Any) -> None:
    """Body of one closed-loop client process: connect, wait for the others, run the users, send back traces."""
    run_in_client_process(_run_job, job, barrier, results)


def run_in_client_process(
    run: Callable[[Any, Any], Coroutine[Any, Any, tuple[list[Trace], float]]], job: Any, barrier: Any, results: Any
) -> None:
    """Run `run(job, barrier)` in this client process and put its outcome, or its error, on results."""
    die_with_parent()
    try:
        results.put(asyncio.run(run(job, barrier)))
    except Exception as exc:  # noqa: BLE001 - any failure must reach the parent, or it waits for its timeout
        barrier.abort()
        results.put(f"{type(exc).__name__}: {exc}")


async def _run_job(job: ClientJob, barrier: Any) -> tuple[list[Trace], float]:
    if job.target == HTTP:
        await asyncio.to_thread(barrier.wait, _SETUP_TIMEOUT_S)
        started = time.process_time()
        prompts = dict(job.prompts)
        host, port = job.address.rsplit(":", 1)
        users = [_http_user(host, int(port), job, user, prompts) for user in job.users]
        traces = [trace for traces in await asyncio.gather(*users) for trace in traces]
        return traces, time.process_time() - started
    from llamaq.client import Client

    async with Client.from_url(job.address, prefix=job.prefix) as client:
        await asyncio.to_thread(barrier.wait, _SETUP_TIMEOUT_S)
        started = time.process_time()
        per_user = await asyncio.gather(*(_redis_user(client, job, user) for user in job.users))
    return [trace for traces in per_user for trace in traces], time.process_time() - started


async def _redis_user(client: Any, job: ClientJob, user: int) -> list[Trace]:
    traces = []
    for turn in range(job.requests_per_user):
        index = request_index(user, turn, job.requests_per_user)
        trace = Trace(index, time.monotonic())
        await record_redis(client, trace, messages=chat_messages(index), max_tokens=job.max_tokens, temperature=0)
        traces.append(trace)
    return traces


async def record_redis(client: Any, trace: Trace, **options: Any) -> None:
    """Send one request with llamaq's Client and record its streamed tokens and end into trace."""
    from llamaq.protocol import DoneEvent, ErrorEvent, TokenEvent

    handle = await client.submit(**options)
    async with handle:
        async for event in handle:
            now = time.monotonic()
            if isinstance(event, TokenEvent) and event.tokens:
                trace.token_times.append(now)
            elif isinstance(event, DoneEvent):
                trace.done_at, trace.n_tokens = now, event.usage.completion_tokens
                trace.worker_ttft_ms = event.timings.ttft_ms
            elif isinstance(event, ErrorEvent):
                trace.error = f"{event.code}: {event.message}"


async def _http_user(
    host: str, port: int, job: ClientJob, user: int, prompts: dict[int, tuple[int, ...]]
) -> list[Trace]:
    traces = []
    for turn in range(job.requests_per_user):
        index = request_index(user, turn, job.requests_per_user)
        body = {"prompt": list(prompts[index]), "n_predict": job.max_tokens, "temperature": 0, "cache_prompt": True}
        trace = Trace(index, time.monotonic())
        await record_http(host, port, body, trace)
        traces.append(trace)
    return traces


async def record_http(host: str, port: int, body: dict[str, Any], trace: Trace) -> None:
    """Stream one /completion from llama-server and record its streamed tokens and end into trace."""
    try:
        async for event in stream_completion(host, port, body):
            now = time.monotonic()
            if event.get("stop"):
                trace.done_at, trace.n_tokens = now, _tokens_predicted(event)
            elif event.get("content") or event.get("tokens"):
                trace.token_times.append(now)
    except (OSError, RuntimeError, ValueError) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"


def _tokens_predicted(final: dict[str, Any]) -> int:
    """Generated tokens in llama-server's final event, an end-of-generation token not counted (as ours)."""
    n = int(final.get("tokens_predicted") or final.get("timings", {}).get("predicted_n", 0))
    # llama-server counts the EOS it sampled; llamaq's usage does not, so one is taken off to compare like with like.
    return n - 1 if final.get("stop_type") == "eos" and n > 0 else n


def client_jobs(
    target: str,
    address: str,
    n_users: int,
    requests_per_user: int,
    max_tokens: int,
    max_processes: int,
    prefix: str = "llamaq",
    prompts: dict[int, list[int]] | None = None,
) -> list[ClientJob]:
    """The users of one run dealt over at most max_processes client processes."""
    jobs = []
    for users in split_users(n_users, max_processes):
        mine: tuple[tuple[int, tuple[int, ...]], ...] = ()
        if prompts is not None:
            indices = [request_index(u, t, requests_per_user) for u in users for t in range(requests_per_user)]
            mine = tuple((i, tuple(prompts[i])) for i in indices)
        jobs.append(ClientJob(target, address, users, requests_per_user, max_tokens, prefix, mine))
    return jobs
