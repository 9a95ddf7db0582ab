"""The engine limit: llamaq's engine in-process against a bare batched loop over the same bindings and context.

For n sequences (n_seq_max = n, n_ctx = n x 512, both KV layouts) the bare loop (bench_bare) generates for n
story prompts with ids 0..n-1 in ascending order. The engine gets the same prompts as greedy completion requests,
all at once, through EngineDriver, with the prefix cache on and off. Before its measured run the engine serves a
scattering warm-up: n closed-loop users send 3 requests each whose lengths are drawn at random (seeded), so they
finish at random times and their ids go back to the pool (or park idle) in random order, as under real traffic.
The measured requests then get ids in that order. What reached llama_decode is recorded (bench_batch_order).

Decode: tokens/s over steps that decoded one token for every sequence, step to step (the engine's iterations
include commands, scheduling, sampling and events). End to end: generated tokens / (first prompt to last token).
"""

from __future__ import annotations

import random
import secrets
import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from llamaq.protocol import Request, RequestKind, SamplingParams

from .bench_bare import BareLoop, BareSettings
from .bench_batch_order import order_summary, recorded_batch_order
from .bench_engine import EngineDriver, MakeRequest
from .bench_overhead import STORY
from .bench_systems import CELLS_PER_SEQUENCE, N_BATCH
from .bench_thread import on_own_thread
from .engine import Engine, EngineConfig

BARE = "bare loop"
ENGINE_CACHE_ON = "engine, prefix cache on"
ENGINE_CACHE_OFF = "engine, prefix cache off"
LAYOUTS = {"per-sequence": False, "unified": True}
_WARM_UP_REQUESTS_PER_USER = 3
_TIMEOUT_S = 1800.0


def limit_prompts(n: int) -> list[str]:
    """The measured prompts: one story opening numbered per sequence, so no two are the same."""
    return [f"{i}. {STORY}" for i in range(n)]


def measure_engine_limit(
    settings: BareSettings, sizes: tuple[int, ...], max_tokens: int, rounds: int, step: Callable[[str], None]
) -> dict[str, Any]:
    """Bare loop and engine (prefix cache on, off) at each size in each layout, rounds alternated."""
    rows: dict[str, dict[str, Any]] = {}
    for layout, unified in LAYOUTS.items():
        for n in sizes:
            context = replace(settings, n_ctx=n * CELLS_PER_SEQUENCE, n_seq_max=n, kv_unified=unified)
            runs: dict[str, list[dict[str, Any]]] = {BARE: [], ENGINE_CACHE_ON: [], ENGINE_CACHE_OFF: []}
            for round_index in range(rounds):
                order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
                for system in order:
                    step(f"engine limit: {layout}, {n} sequences, {system}, round {round_index + 1}")
                    seed = 1000 * round_index + n
                    runs[system].append(_run(system, context, n, max_tokens, seed))
            rows[f"{layout}/{n}"] = {"layout": layout, "sequences": n, **_combine(runs)}
    return {
        "sizes": list(sizes),
        "max_tokens": max_tokens,
        "rounds": rounds,
        "cells_per_sequence": CELLS_PER_SEQUENCE,
        "n_batch": settings.n_batch,
        "scatter": (
            f"before each engine run: {_WARM_UP_REQUESTS_PER_USER} requests from each of n closed-loop users, "
            "max_tokens uniform in 1..max(2, max_tokens/3) (seeded), other prompts than the measured ones"
        ),
        "rows": rows,
    }


def _run(system: str, settings: BareSettings, n: int, max_tokens: int, seed: int) -> dict[str, Any]:
    prompts = limit_prompts(n)
    if system == BARE:
        return run_bare(settings, prompts, max_tokens)
    return run_engine(settings, prompts, max_tokens, prefix_cache=system == ENGINE_CACHE_ON, seed=seed)


def run_bare(settings: BareSettings, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The bare loop, on a thread of its own as the engine's loop runs (bench_thread says why)."""

    def body() -> dict[str, Any]:
        with BareLoop(settings) as loop:
            # A first generation of other prompts, untimed, as the engine serves its scattering warm-up first.
            loop.generate([f"Warm-up {i}: {STORY}" for i in range(len(prompts))], 4)
            with recorded_batch_order() as calls:
                summary: dict[str, Any] = loop.generate(prompts, max_tokens).summary()
        return {**summary, "batch_order": order_summary(calls, len(prompts))}

    return on_own_thread(body, "bare-loop")


def run_engine(
    settings: BareSettings, prompts: list[str], max_tokens: int, prefix_cache: bool, seed: int
) -> dict[str, Any]:
    """The engine in-process on the same prompts, after the scattering warm-up; summarised as the bare loop."""
    n = len(prompts)
    config = EngineConfig(
        settings.model,
        n_ctx=settings.n_ctx,
        n_seq_max=settings.n_seq_max,
        n_batch=settings.n_batch,
        n_threads=settings.threads,
        kv_unified=settings.kv_unified,
    )
    engine = Engine(config)
    try:
        with EngineDriver(engine, settings.n_batch, prefix_cache) as driver:
            driver.run(n, _WARM_UP_REQUESTS_PER_USER, _scatter_requests(max_tokens, seed), _TIMEOUT_S)
            with recorded_batch_order() as calls:
                traces = driver.run(n, 1, _completions(prompts, max_tokens), _TIMEOUT_S)
            steps = list(driver.steps)
    finally:
        engine.close()
    errors = [t.error for t in traces if t.error]
    if errors:
        raise RuntimeError(f"{len(errors)} engine requests failed: {errors[0]}")
    started = min(t.sent_at for t in traces)
    ended = max(t.done_at for t in traces if t.done_at is not None)
    generated = sum(t.n_tokens for t in traces)
    full = [steps[k][0] - steps[k - 1][0] for k in range(1, len(steps)) if _full(steps[k][1], n)]
    return {
        "sequences": float(n),
        "generated": float(generated),
        "e2e_s": round(ended - started, 3),
        "e2e_tokens_per_s": round(generated / (ended - started), 2),
        "decode_steps": float(len(full)),
        "decode_step_ms": round(sum(full) / len(full) * 1000, 3) if full else 0.0,
        "decode_tokens_per_s": round(n * len(full) / sum(full), 2) if full else 0.0,
        "batch_order": order_summary(calls, n),
    }


def _full(stats: Any, n: int) -> bool:
    return bool(stats.n_sequences == n and stats.n_tokens == n)


def _completions(prompts: list[str], max_tokens: int) -> MakeRequest:
    client_id = secrets.token_hex(8)

    def make(index: int) -> Request:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return Request(f"limit{index:06d}", client_id, RequestKind.COMPLETION, prompt=prompts[index], params=params)

    return make


def _scatter_requests(max_tokens: int, seed: int) -> MakeRequest:
    """Warm-up requests of random length (seeded): they end at random steps, leaving ids in random order."""
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    client_id = secrets.token_hex(8)

    def make(index: int) -> Request:
        length = lengths.setdefault(index, rng.randint(1, max(2, max_tokens // 3)))
        params = SamplingParams(max_tokens=length, temperature=0.0)
        prompt = f"Warm-up {index}: {STORY}"
        return Request(f"scatter{index:06d}", client_id, RequestKind.COMPLETION, prompt=prompt, params=params)

    return make


def _combine(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per system the median over rounds; per engine system its ratios to the bare loop, round by round."""
    out: dict[str, Any] = {}
    for system, rounds in runs.items():
        keys = [k for k, v in rounds[0].items() if isinstance(v, float)]
        out[system] = {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}
        out[system]["batch_order"] = rounds[-1]["batch_order"]
        out[system]["rounds"] = [{k: r[k] for k in keys} for r in rounds]
    for system in (ENGINE_CACHE_ON, ENGINE_CACHE_OFF):
        for metric in ("decode_tokens_per_s", "e2e_tokens_per_s"):
            ratios = [
                e[metric] / b[metric] for e, b in zip(runs[system], runs[BARE], strict=True) if b[metric] and e[metric]
            ]
            out[system][f"{metric}_vs_bare"] = round(statistics.median(ratios), 3) if ratios else None
    return out


def default_settings(model: Any, threads: int) -> BareSettings:
    """The context shape of the section before its per-size n_ctx and n_seq_max are set."""
    return BareSettings(model, CELLS_PER_SEQUENCE, 1, N_BATCH, threads, False)
