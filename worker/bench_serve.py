"""The open-loop section (like `vllm bench serve`): the shipped chat requests arrive as a seeded Poisson process at
each offered rate, to llamaq through Redis and to llama-server, each freshly started for every rate (no cache
carried over), the two alternated rate by rate. Rates are swept upwards until each system saturates
(bench_serve_metrics defines it), plus `serve_beyond` more to show the knee.

Output length: every request has max_tokens from the set. If llamaq's protocol has `ignore_eos`, both systems
are told to ignore end-of-generation, so each request generates exactly max_tokens; otherwise neither is, and a
request ends at its first end-of-generation token or at max_tokens (greedy, the same rule for both; the set's
tasks ask for long answers). The report says which, and the output tokens each system produced.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaq.protocol import ChatMessage, SamplingParams

from .bench_clients import HTTP, REDIS, client_jobs, run_client_processes
from .bench_http import find_llama_server, llama_server
from .bench_open_loop import OpenLoopJob, TimedRequest, run_open_loop
from .bench_requests import ChatRequest, load_requests, poisson_arrivals, requests_for_rate
from .bench_serve_metrics import saturation, saturation_rate, serving_metrics
from .bench_systems import CELLS_PER_SEQUENCE, LLAMA_SERVER, N_BATCH, REDIS_PATH, worker_process
from .engine import Engine, EngineConfig

if TYPE_CHECKING:
    from .bench_plan import Plan

_WARM_UP_TIMEOUT_S = 120.0
_SLOWEST_TOKENS_PER_S = 5.0
"""A run slower than this (tokens of all its requests over the time after its last arrival) has gone wrong."""


@dataclass(frozen=True)
class Server:
    """How to start the systems of one open-loop run."""

    model: Path
    threads: int
    parallel: int
    work: Path
    url: str | None = None
    llama_server: Path | None = None
    n_batch: int = N_BATCH


def llamaq_ignores_eos() -> bool:
    """True when llamaq's protocol lets a request generate past end-of-generation (SamplingParams.ignore_eos)."""
    return "ignore_eos" in {f.name for f in dataclasses.fields(SamplingParams)}


def measure_serve(
    args: Any, plan: Plan, model: Path, url: str | None, work: Path, step: Callable[[str], None]
) -> dict[str, Any]:
    """The rate sweep of both systems; per rate the vLLM metrics and whether the system saturated."""
    requests = capped(load_requests(args.requests_file), plan.serve_max_tokens)
    tokens = render_requests(model, requests)
    binary, source = (None, "skipped") if args.skip_llama_server else find_llama_server(args.llama_server)
    server = Server(model, args.threads, plan.serve_parallel, work, url, binary)
    ignore_eos = llamaq_ignores_eos()
    systems: dict[str, dict[str, Any]] = {REDIS_PATH: {"by_rate": {}}}
    if binary is not None:
        systems[LLAMA_SERVER] = {"by_rate": {}}
    beyond = {name: plan.serve_beyond for name in systems}
    for i, rate in enumerate(plan.serve_rates):
        n = requests_for_rate(len(requests), rate, plan.serve_window_s, plan.serve_min_requests)
        arrivals = poisson_arrivals(n, rate, seed=18_000 + i)
        timed = [
            TimedRequest(r.index, at, r.max_tokens, r.messages, tuple(tokens[r.index]))
            for r, at in zip(requests, arrivals, strict=False)
        ]
        for name in list(systems) if i % 2 == 0 else list(reversed(systems)):
            if beyond[name] < 0:
                continue
            step(f"open loop: {name}, {rate:g} requests/s, {n} requests")
            row = serve_once(name, server, timed, ignore_eos)
            row["offered_rate"] = rate
            row["saturation"] = saturation(row, args.ttft_p99_bound_ms)
            row["saturated"] = bool(row["saturation"])
            systems[name]["by_rate"][f"{rate:g}"] = row
            if row["saturated"]:
                beyond[name] -= 1
    for entry in systems.values():
        entry["sustained_rate"], entry["saturated_at"] = saturation_rate(entry["by_rate"])
    return {
        "rates": list(plan.serve_rates),
        "window_s": plan.serve_window_s,
        "min_requests": plan.serve_min_requests,
        "parallel": plan.serve_parallel,
        "cells_per_sequence": CELLS_PER_SEQUENCE,
        "ignore_eos": ignore_eos,
        "output_length_rule": (
            "exactly max_tokens (ignore_eos for both systems)"
            if ignore_eos
            else "greedy until end-of-generation or max_tokens, for both systems (llamaq has no ignore_eos)"
        ),
        "ttft_p99_bound_ms": args.ttft_p99_bound_ms,
        "request_set": {"count": len(requests), "mean_max_tokens": _mean(r.max_tokens for r in requests)},
        "llama_server": source,
        "clients": "one client process (one asyncio event loop) for each system; each request on its own "
        "connection (HTTP) or through one shared llamaq Client (Redis)",
        "systems": systems,
    }


def serve_once(name: str, server: Server, timed: list[TimedRequest], ignore_eos: bool) -> dict[str, Any]:
    """Start the system, warm it up, run the open-loop schedule, stop it; the run's serving metrics."""
    timeout_s = (
        _WARM_UP_TIMEOUT_S + max(r.at_s for r in timed) + sum(r.max_tokens for r in timed) / (_SLOWEST_TOKENS_PER_S)
    )
    prompt_tokens = {r.index: len(r.tokens) for r in timed}
    n_ctx = server.parallel * CELLS_PER_SEQUENCE
    tag = f"{name.split()[0]}-{len(timed)}-{secrets.token_hex(2)}"
    if name == REDIS_PATH:
        if server.url is None:
            raise RuntimeError("no Redis URL")
        prefix = f"bserve{secrets.token_hex(3)}"
        log = server.work / f"worker-serve-{tag}.log"
        args = (server.url, prefix, server.parallel, n_ctx, server.threads, log, server.n_batch)
        with worker_process(*args):
            run_client_processes(client_jobs(REDIS, server.url, 1, 1, 4, 1, prefix), _WARM_UP_TIMEOUT_S)
            job = OpenLoopJob(REDIS, server.url, tuple(timed), prefix, ignore_eos)
            run = run_open_loop(job, timeout_s)
    else:
        if server.llama_server is None:
            raise RuntimeError("llama-server is not available")
        log = server.work / f"llama-server-serve-{tag}.log"
        args2 = (server.llama_server, server.model, server.parallel, n_ctx, server.threads, server.n_batch, log)
        with llama_server(*args2) as (host, port):
            address = f"{host}:{port}"
            warm = client_jobs(HTTP, address, 1, 1, 4, 1, prompts={0: list(timed[0].tokens)})
            run_client_processes(warm, _WARM_UP_TIMEOUT_S)
            run = run_open_loop(OpenLoopJob(HTTP, address, tuple(timed), ignore_eos=ignore_eos), timeout_s)
    row = serving_metrics(run.traces, prompt_tokens)
    row |= {"late_sends": run.late_sends, "max_late_ms": run.max_late_ms}
    return row


def capped(requests: list[ChatRequest], max_tokens: int | None) -> list[ChatRequest]:
    """The requests with max_tokens at most the cap (all unchanged without one)."""
    if max_tokens is None:
        return requests
    return [dataclasses.replace(r, max_tokens=min(r.max_tokens, max_tokens)) for r in requests]


def render_requests(model: Path, requests: list[ChatRequest]) -> dict[int, list[int]]:
    """Every request's chat rendered by our chat template and tokenized, for llama-server's /completion."""
    engine = Engine(EngineConfig(model, n_ctx=CELLS_PER_SEQUENCE, n_seq_max=1, n_threads=1))
    try:
        return {r.index: engine.chat_tokens([ChatMessage(role, text) for role, text in r.messages]) for r in requests}
    finally:
        engine.close()


def _mean(values: Any) -> float:
    items = list(values)
    return round(sum(items) / len(items), 1) if items else 0.0
