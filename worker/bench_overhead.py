"""Scheduler overhead: the share of each engine iteration spent outside `llama_decode` while n sequences decode.

Defined on the in-process engine (no Redis). An iteration is the time between two consecutive calls of the engine
loop's emit callback, so it holds everything the loop does for one step: commands, deadlines, scheduling, batch
filling, llama_decode, sampling, events and the callback itself. Time inside llama_decode is measured by wrapping
`llama_cpp.llama_decode` for the run; StepStats' `decode_s` (which also covers filling the batch) is reported too.
Only iterations whose step decoded exactly one token for each of the n sequences count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp

from .bench_engine import EngineDriver, completion_request
from .bench_systems import CELLS_PER_SEQUENCE, N_BATCH
from .engine import Engine, EngineConfig

# A story opening: models continue it for hundreds of tokens, so all n sequences keep decoding.
STORY = "The lighthouse keeper climbed the stairs, trimmed the wick and looked out over the grey sea. Then"


@contextmanager
def timed_llama_decode() -> Iterator[list[float]]:
    """Record the seconds of every llama_decode call made while the block runs (Engine looks it up per call)."""
    original: Callable[..., Any] = llama_cpp.llama_decode
    durations: list[float] = []

    def timed(ctx: Any, batch: Any) -> Any:
        started = time.perf_counter()
        status = original(ctx, batch)
        durations.append(time.perf_counter() - started)
        return status

    llama_cpp.llama_decode = timed
    try:
        yield durations
    finally:
        llama_cpp.llama_decode = original


def measure_overhead(model: Path, threads: int, n_sequences: int, max_tokens: int) -> dict[str, Any]:
    """Decode n_sequences completions at once and split each full-batch iteration into its parts."""
    config = EngineConfig(
        model, n_ctx=n_sequences * CELLS_PER_SEQUENCE, n_seq_max=n_sequences, n_batch=N_BATCH, n_threads=threads
    )
    engine = Engine(config)
    try:
        with EngineDriver(engine, N_BATCH) as driver:
            driver.run(1, 1, completion_request(STORY, 4), 600)
            with timed_llama_decode() as inside:
                driver.run(n_sequences, 1, completion_request(STORY, max_tokens), 1800)
            steps = list(driver.steps)
    finally:
        engine.close()
    # One llama_decode per step (no retries in this run); otherwise fall back to StepStats alone.
    aligned = len(inside) == len(steps)
    iteration = llama = step_decode = step = 0.0
    counted = 0
    for k in range(1, len(steps)):
        at, stats = steps[k]
        if stats.n_sequences != n_sequences or stats.n_tokens != n_sequences:
            continue
        iteration += at - steps[k - 1][0]
        llama += inside[k] if aligned else stats.decode_s
        step_decode += stats.decode_s
        step += stats.step_s
        counted += 1
    if not counted:
        return {"sequences": n_sequences, "error": "no iteration decoded every sequence"}

    def per_step_ms(seconds: float) -> float:
        return round(seconds / counted * 1000, 3)

    return {
        "sequences": n_sequences,
        "iterations": counted,
        "llama_decode_timed_directly": aligned,
        "iteration_ms": per_step_ms(iteration),
        "llama_decode_ms": per_step_ms(llama),
        "batch_fill_ms": per_step_ms(step_decode - llama),
        "sampling_and_events_ms": per_step_ms(step - step_decode),
        "loop_rest_ms": per_step_ms(iteration - step),
        "overhead_share": round((iteration - llama) / iteration, 4),
        "overhead_share_stepstats": round((iteration - step_decode) / iteration, 4),
        "tokens_per_s": round(counted * n_sequences / iteration, 1),
    }
