"""One runner per `llamaq bench` section: each takes the run's context and returns the section's results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .settings import WorkerSettings

if TYPE_CHECKING:
    from .bench_plan import Plan
    from .bench_suite import Context

Runner = Callable[["Context", dict[str, Any]], dict[str, Any]]


def steps_of(section: str, plan: Plan, systems: list[str]) -> int:
    """Progress steps a section reports, for the progress bar."""
    counts = {
        "throughput": len(plan.clients) * len(systems) * plan.rounds + 1,
        "engine_limit": 2 * len(plan.limit_sizes) * 3 * plan.limit_rounds,
        "serve": 2 * len(plan.serve_rates),
        "threads": 2 * len(plan.thread_clients) * len(plan.thread_counts),
        "step_budget": len(plan.budgets),
        "round_trips": len(plan.round_trip_clients),
        "turns": 2,
        "shared_prefix": 4,
        "overhead": len(plan.overhead_sizes),
    }
    return counts.get(section, 1)


def _need_url(ctx: Context) -> str:
    if ctx.url is None:
        raise RuntimeError("this section needs Redis")
    return ctx.url


def _run_throughput(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_throughput import measure_throughput

    return measure_throughput(ctx.args, ctx.plan, ctx.model, ctx.url, ctx.work, ctx.progress.step, ctx.systems, results)


def _run_engine_limit(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_limit import default_settings, measure_engine_limit

    plan = ctx.plan
    settings = default_settings(ctx.model, ctx.args.threads)
    return measure_engine_limit(settings, plan.limit_sizes, plan.limit_tokens, plan.limit_rounds, ctx.progress.step)


def _run_serve(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_serve import measure_serve

    data = measure_serve(ctx.args, ctx.plan, ctx.model, ctx.url, ctx.work, ctx.progress.step)
    results["meta"].setdefault("llama_server", data["llama_server"])
    return data


def _run_threads(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_levers import measure_threads

    return measure_threads(ctx.args, ctx.plan, ctx.model, _need_url(ctx), ctx.work, ctx.progress.step)


def _run_step_budget(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_levers import measure_step_budget

    return measure_step_budget(ctx.args, ctx.plan, ctx.model, _need_url(ctx), ctx.work, ctx.progress.step)


def _run_round_trips(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_levers import measure_round_trips

    return measure_round_trips(ctx.args, ctx.plan, ctx.model, _need_url(ctx), ctx.work, ctx.progress.step)


def _run_turns(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_sections import measure_turns

    plan = ctx.plan
    base = _worker_settings(ctx, n_ctx=8192, parallel=4)
    data: dict[str, Any] = asyncio.run(
        measure_turns(_need_url(ctx), base, plan.turns, plan.turn_repeats, plan.turn_tokens, ctx.progress.step)
    )
    return data


def _run_shared_prefix(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_sections import measure_shared_prefix

    plan = ctx.plan
    data: dict[str, Any] = asyncio.run(
        measure_shared_prefix(
            _need_url(ctx),
            _worker_settings(ctx),
            plan.shared_chats,
            plan.shared_system_repeats,
            plan.shared_tokens,
            ctx.progress.step,
        )
    )
    return data


def _run_overhead(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_overhead import measure_overhead

    rows = {}
    for n in ctx.plan.overhead_sizes:
        ctx.progress.step(f"overhead: {n} sequences decoding")
        rows[str(n)] = measure_overhead(ctx.model, ctx.args.threads, n, ctx.plan.overhead_tokens)
    return {"sizes": list(ctx.plan.overhead_sizes), "rows": rows}


def _run_pressure(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_pressure import measure_pressure

    plan = ctx.plan
    ctx.progress.step(f"pressure: {plan.pressure_requests} requests from {plan.pressure_processes} processes")
    return measure_pressure(
        _need_url(ctx),
        ctx.model,
        ctx.args.threads,
        plan.pressure_requests,
        plan.pressure_processes,
        plan.max_tokens,
        plan.pressure_parallel,
        ctx.work,
    )


def _worker_settings(ctx: Context, **overrides: Any) -> WorkerSettings:
    base = WorkerSettings(
        redis_url=ctx.url, model_path=ctx.model, threads=ctx.args.threads, n_batch=512, metrics_port=0
    )
    return replace(base, **overrides)


RUNNERS: dict[str, Runner] = {
    "throughput": _run_throughput,
    "engine_limit": _run_engine_limit,
    "serve": _run_serve,
    "threads": _run_threads,
    "step_budget": _run_step_budget,
    "round_trips": _run_round_trips,
    "turns": _run_turns,
    "shared_prefix": _run_shared_prefix,
    "overhead": _run_overhead,
    "pressure": _run_pressure,
}
