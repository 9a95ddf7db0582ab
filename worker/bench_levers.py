"""Levers of llamaq's speed, each a bench section of its own:

- threads: llama.cpp threads 1 against 2 (on a 2-core machine the event loop, Valkey and the clients need CPU too),
  for llamaq through Redis and for llama-server, closed loop at 1 and 16 streams, alternated.
- step_budget: the worker's step token budget (--n-batch: the most tokens one llama_decode takes, decodes plus
  prefill chunks) against TTFT and ITL, open loop at one offered rate.
- round_trips: the worker's Redis round trips per engine step (counted in the worker by bench_rtt's probe) and
  every command Valkey ran per step (INFO commandstats: worker and clients), closed loop.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from .bench_clients import REDIS, client_jobs, run_client_processes
from .bench_http import find_llama_server
from .bench_load import summarize
from .bench_open_loop import TimedRequest
from .bench_requests import load_requests, poisson_arrivals
from .bench_rtt import read_counts
from .bench_serve import Server, capped, llamaq_ignores_eos, render_requests, serve_once
from .bench_systems import (
    CELLS_PER_SEQUENCE,
    LLAMA_SERVER,
    REDIS_PATH,
    Load,
    prompt_tokens,
    run_llama_server,
    run_redis,
    worker_process,
)

if TYPE_CHECKING:
    from .bench_plan import Plan

Step = Callable[[str], None]


def measure_threads(args: Any, plan: Plan, model: Path, url: str, work: Path, step: Step) -> dict[str, Any]:
    """Closed-loop tokens/s, TTFT and ITL per system, client count and llama.cpp thread count."""
    binary = None if args.skip_llama_server else find_llama_server(args.llama_server)[0]
    prompts = prompt_tokens(model, max(plan.thread_clients) * plan.requests_per_client)
    runners: dict[str, Callable[[Load], Any]] = {REDIS_PATH: lambda load: run_redis(url, load, work)}
    if binary is not None:
        runners[LLAMA_SERVER] = lambda load: run_llama_server(binary, prompts, load, work)
    rows: dict[str, dict[str, Any]] = {}
    turn = 0
    for clients in plan.thread_clients:
        for threads in plan.thread_counts:
            load = Load(clients, plan.requests_per_client, plan.max_tokens, threads, model, args.client_processes)
            for name in list(runners) if turn % 2 == 0 else list(reversed(runners)):
                step(f"threads: {name}, {clients} clients, {threads} threads")
                traces, _extra = runners[name](load)
                rows[f"{name}|{clients}|{threads}"] = {
                    "system": name,
                    "clients": clients,
                    "threads": threads,
                    **summarize(traces),
                }
            turn += 1
    return {"thread_counts": list(plan.thread_counts), "clients": list(plan.thread_clients), "rows": rows}


def measure_step_budget(args: Any, plan: Plan, model: Path, url: str, work: Path, step: Step) -> dict[str, Any]:
    """llamaq through Redis at one offered rate with each step token budget: TTFT, TPOT, ITL, throughput."""
    requests = capped(load_requests(args.requests_file)[: plan.budget_requests], plan.serve_max_tokens)
    tokens = render_requests(model, requests)
    arrivals = poisson_arrivals(len(requests), plan.budget_rate, seed=18_900)
    timed = [
        TimedRequest(r.index, at, r.max_tokens, r.messages, tuple(tokens[r.index]))
        for r, at in zip(requests, arrivals, strict=True)
    ]
    server = Server(model, args.threads, plan.serve_parallel, work, url)
    rows = {}
    for budget in plan.budgets:
        step(f"step budget: {budget} tokens per step at {plan.budget_rate:g} requests/s")
        rows[str(budget)] = serve_once(REDIS_PATH, replace(server, n_batch=budget), timed, llamaq_ignores_eos())
    return {"rate": plan.budget_rate, "requests": len(timed), "parallel": plan.serve_parallel, "rows": rows}


def measure_round_trips(args: Any, plan: Plan, model: Path, url: str, work: Path, step: Step) -> dict[str, Any]:
    """Round trips of the worker and Valkey commands per engine step, closed loop at each client count."""
    rows = {}
    for clients in plan.round_trip_clients:
        step(f"round trips: {clients} clients")
        prefix = f"brtt{secrets.token_hex(3)}"
        counts_path = work / f"rtt-{prefix}.json"
        log_path = work / f"worker-rtt-{clients}.log"
        launcher = ("-m", "llamaq.worker.bench_rtt", str(counts_path))
        n_ctx = clients * CELLS_PER_SEQUENCE
        with worker_process(url, prefix, clients, n_ctx, args.threads, log_path, launcher=launcher):
            run_client_processes(client_jobs(REDIS, url, 1, 1, 4, 1, prefix), 120)
            metrics_url = _metrics_url(log_path)
            before = _snapshot(counts_path, metrics_url, url)
            jobs = client_jobs(REDIS, url, clients, plan.requests_per_client, plan.max_tokens, 1, prefix)
            traces = run_client_processes(jobs, 600).traces
            after = _snapshot(counts_path, metrics_url, url)
        steps = after[1] - before[1]
        trips = after[0] - before[0]
        commands = after[2] - before[2]
        rows[str(clients)] = {
            "steps": steps,
            "tokens": sum(t.n_tokens for t in traces),
            "worker_round_trips": sum(trips.values()),
            "worker_round_trips_per_step": _per(sum(trips.values()), steps),
            "worker_round_trips_by_first_command": dict(trips.most_common()),
            "valkey_commands_per_step": {name: _per(n, steps) for name, n in commands.most_common(8)},
        }
    return {"clients": list(plan.round_trip_clients), "max_tokens": plan.max_tokens, "rows": rows}


def _snapshot(counts_path: Path, metrics_url: str, redis_url: str) -> tuple[Counter[str], float, Counter[str]]:
    """Worker round trips so far, engine steps so far, Valkey command calls so far."""
    time.sleep(0.5)  # past the probe's next write and the last step's publish
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    steps = sum(float(m.group(1)) for m in re.finditer(r"^llamaq_step_seconds_count\{[^}]*\} (\S+)$", text, re.M))
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})
    return read_counts(counts_path), steps, calls


def _metrics_url(log_path: Path) -> str:
    found = re.search(r"metrics on http://[^:]+:(\d+)/metrics", log_path.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"the worker did not say where its metrics are ({log_path})")
    return f"http://127.0.0.1:{found.group(1)}/metrics"


def _per(n: float, steps: float) -> float | None:
    return round(n / steps, 3) if steps else None
