"""Batch order and sequence ids, measured: llama_decode time of one decode step of 16 sequences when the batch lists
them in ascending id order, descending, shuffled, ascending with gaps between ids, or as two runs; in both KV
layouts; and what moving one sequence to another id costs (llamaq's packing of running ids).

Bare llama-cpp-python calls through llamaq's Engine (the batch is written in the order given here, bypassing the
engine's own ordering). Writes bench/results/batch_order.json and .md. Usage: python bench/batch_order.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import llama_cpp

from llamaq.worker.engine import Engine, EngineConfig
from llamaq.worker.model_files import default_model_path

N_SEQUENCES = 16
PROMPT_TOKENS = 32
STEPS = 24
CELLS_PER_SEQUENCE = 512


def orders(n_seq_max: int) -> dict[str, list[int]]:
    """The id lists of every case, by name; ids below n_seq_max."""
    ascending = list(range(N_SEQUENCES))
    shuffled = ascending[:]
    random.Random(1).shuffle(shuffled)
    cases = {"ascending": ascending, "descending": ascending[::-1], "shuffled": shuffled}
    if n_seq_max >= 2 * N_SEQUENCES:
        cases["ascending, every other id"] = list(range(0, 2 * N_SEQUENCES, 2))
        cases["ascending, two runs of 8"] = [*range(8), *range(N_SEQUENCES, N_SEQUENCES + 8)]
    return cases


def decode_times(engine: Engine, order: list[int]) -> float:
    """Median ms of a decode step feeding one token to each sequence, the batch written in `order`."""
    for seq_id in order:
        engine.free_sequence(seq_id)
        _decode_in_order(engine, [(seq_id, list(range(100, 100 + PROMPT_TOKENS)), 0)])
    position = PROMPT_TOKENS
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        _decode_in_order(engine, [(seq_id, [200], position) for seq_id in order])
        times.append((time.perf_counter() - started) * 1000)
        position += 1
    return statistics.median(times)


def _decode_in_order(engine: Engine, pieces: list[tuple[int, list[int], int]]) -> None:
    """One llama_decode of the pieces exactly in this order (Engine.decode would sort them)."""
    batch = engine._batch
    i = 0
    for seq_id, tokens, start in pieces:
        for offset, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + offset, 1
            batch.seq_id[i][0], batch.logits[i] = seq_id, 1
            i += 1
    batch.n_tokens = i
    assert llama_cpp.llama_decode(engine._ctx, batch) == 0


def move_ms(engine: Engine, n_cells: int) -> float:
    """Median ms of moving a sequence of n_cells positions to a free id and back (one move each way)."""
    engine.free_sequence(0)
    engine.free_sequence(1)
    for start in range(0, n_cells, 256):
        _decode_in_order(engine, [(0, [300] * min(256, n_cells - start), start)])
    times = []
    for _ in range(6):
        for source, target in ((0, 1), (1, 0)):
            started = time.perf_counter()
            assert engine.move_sequence(source, target)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for unified in (False, True):
        n_seq_max = 2 * N_SEQUENCES
        layout = "unified" if unified else "per-sequence streams"
        config = EngineConfig(
            default_model_path(),
            n_ctx=n_seq_max * CELLS_PER_SEQUENCE,
            n_seq_max=n_seq_max,
            n_batch=512,
            n_threads=args.threads,
            kv_unified=unified,
        )
        engine = Engine(config)
        try:
            results[layout] = {name: decode_times(engine, order) for name, order in orders(n_seq_max).items()}
            if not unified:
                results["moving one sequence (per-sequence streams)"] = {
                    f"{n} cells": move_ms(engine, n) for n in (64, 256, 512)
                }
        finally:
            engine.close()
        print(layout, results[layout], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_order.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"One decode step of {N_SEQUENCES} sequences x 1 token (median of {STEPS} steps, ms), SmolLM2-135M Q4_1, "
        f"{args.threads} threads, flash attention, Q8_0 KV, {CELLS_PER_SEQUENCE} cells per sequence",
        "",
    ]
    for table, row in results.items():
        lines += [f"**{table}**", "", "| case | ms |", "|---|---|"]
        lines += [f"| {name} | {value:.1f} |" for name, value in row.items()]
        lines.append("")
    (args.out / "batch_order.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
