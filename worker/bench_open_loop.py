"""Open-loop clients: every request is sent at its own arrival time, whether or not earlier ones have finished
(as `vllm bench serve --request-rate`), from one client process, to llamaq through Redis or to llama-server.
Imports no llama.cpp: the process is only a client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .bench_clients import HTTP, ClientRun, record_http, record_redis, run_client_processes, run_in_client_process
from .bench_load import Trace

_LATE_S = 0.05


@dataclass(frozen=True)
class TimedRequest:
    """One request of an open-loop run and when to send it."""

    index: int
    at_s: float
    """Offset from the common start."""
    max_tokens: int
    messages: tuple[tuple[str, str], ...] = ()
    """llamaq: the chat."""
    tokens: tuple[int, ...] = ()
    """llama-server: the chat rendered by our template and tokenized."""


@dataclass(frozen=True)
class OpenLoopJob:
    """What the client process sends, where to, and how output length is enforced."""

    target: str
    address: str
    requests: tuple[TimedRequest, ...]
    prefix: str = "llamaq"
    ignore_eos: bool = False
    """Both systems generate exactly max_tokens (llamaq only when its protocol has ignore_eos)."""


@dataclass
class OpenLoopRun:
    """The traces of a run and how late the client sent requests against their schedule."""

    traces: list[Trace]
    late_sends: int
    max_late_ms: float


def run_open_loop(job: OpenLoopJob, timeout_s: float) -> OpenLoopRun:
    """Send every request of job at its time from a client process; its traces and its punctuality."""
    run: ClientRun = run_client_processes([job], timeout_s, body=open_loop_process)
    scheduled = {r.index: r.at_s for r in job.requests}
    start = min((t.sent_at - scheduled[t.index] for t in run.traces), default=0.0)
    late = [t.sent_at - start - scheduled[t.index] for t in run.traces]
    return OpenLoopRun(run.traces, sum(x > _LATE_S for x in late), round(max(late, default=0.0) * 1000, 1))


def open_loop_process(job: OpenLoopJob, barrier: Any, results: Any) -> None:
    """Body of the open-loop client process."""
    run_in_client_process(_run, job, barrier, results)


async def _run(job: OpenLoopJob, barrier: Any) -> tuple[list[Trace], float]:
    if job.target == HTTP:
        host, port = job.address.rsplit(":", 1)
        await asyncio.to_thread(barrier.wait, 120.0)
        return await _send_all(job, lambda request, trace: _http(host, int(port), job, request, trace))
    from llamaq.client import Client

    async with Client.from_url(job.address, prefix=job.prefix) as client:
        await asyncio.to_thread(barrier.wait, 120.0)
        return await _send_all(job, lambda request, trace: _redis(client, job, request, trace))


async def _send_all(job: OpenLoopJob, send: Any) -> tuple[list[Trace], float]:
    started = time.monotonic()
    cpu = time.process_time()
    traces = [Trace(r.index, 0.0) for r in job.requests]

    async def one(request: TimedRequest, trace: Trace) -> None:
        await asyncio.sleep(max(0.0, started + request.at_s - time.monotonic()))
        trace.sent_at = time.monotonic()
        await send(request, trace)

    await asyncio.gather(*(one(r, t) for r, t in zip(job.requests, traces, strict=True)))
    return traces, time.process_time() - cpu


async def _redis(client: Any, job: OpenLoopJob, request: TimedRequest, trace: Trace) -> None:
    options: dict[str, Any] = {"max_tokens": request.max_tokens, "temperature": 0}
    if job.ignore_eos:
        options["ignore_eos"] = True
    messages = [{"role": role, "content": content} for role, content in request.messages]
    try:
        await record_redis(client, trace, messages=messages, **options)
    except Exception as exc:  # noqa: BLE001 - one failed request is a result of the run, not its end
        trace.error = f"{type(exc).__name__}: {exc}"


async def _http(host: str, port: int, job: OpenLoopJob, request: TimedRequest, trace: Trace) -> None:
    body: dict[str, Any] = {
        "prompt": list(request.tokens),
        "n_predict": request.max_tokens,
        "temperature": 0,
        "cache_prompt": True,
    }
    if job.ignore_eos:
        body["ignore_eos"] = True
    await record_http(host, port, body, trace)
