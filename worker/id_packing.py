"""Which sequences to move so that the running ones hold consecutive ids (per-sequence KV streams).

Pure planning over id maps; the KV manager applies a plan to its bookkeeping and the engine moves the cells.
With one KV stream per sequence, llama.cpp cuts a batch into one micro-batch per run of consecutive sequence ids
(`llama_batch_allocr::split_equal(n_ubatch, sequential=true)`), and every micro-batch is a full pass over the
model's weights: 16 decoding sequences spread over 16 runs take 2.2x as long per step as the same 16 in one run
(docs/kv-layouts.md#batch-order). Traffic scatters ids (requests end in any order; a conversation's next turn
continues its own idle sequence wherever it sits), so the running set is packed back into one run by moving
sequences, which costs copying their cells once instead of extra passes over the weights at every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Relocation:
    """Move the running sequence at `source` to `target`; with `swap`, the idle sequence at `target` goes to
    `source` in exchange (otherwise `target` is free)."""

    source: int
    target: int
    swap: bool
    cells: int
    """Cells copied: the running sequence's, plus the idle one's in a swap."""


def count_runs(ids: Iterable[int]) -> int:
    """Maximal runs of consecutive integers among `ids`: llama.cpp's micro-batches for a batch over them."""
    ordered = sorted(set(ids))
    return sum(1 for i, seq_id in enumerate(ordered) if i == 0 or ordered[i - 1] != seq_id - 1)


def plan_packing(
    n_ids: int,
    running: Mapping[int, int],
    idle: Mapping[int, int],
    pinned: Iterable[int] = (),
    max_cells: int | None = None,
) -> list[Relocation]:
    """Relocations that bring the running ids (id -> cells held) into one run of consecutive ids.

    The target run is the window of len(running) ids that costs the fewest copied cells: running sequences
    outside it move in, idle ones inside it (id -> cells) are swapped out into the ids those leave. Pinned ids
    (their cells are being copied or restored this step) never move. With `max_cells`, the cheapest
    relocations that fit are planned (at least one): the rest follow in later steps.
    """
    if count_runs(running) <= 1:
        return []
    window = _cheapest_window(n_ids, running, idle, set(pinned))
    if window is None:
        return []
    inside = range(window, window + len(running))
    movers = sorted((s for s in running if s not in inside), key=lambda s: (running[s], s))
    targets = sorted((t for t in inside if t not in running), key=lambda t: (idle.get(t, 0), t))
    plan = [
        Relocation(source, target, target in idle, running[source] + idle.get(target, 0))
        for source, target in zip(movers, targets, strict=True)
    ]
    plan.sort(key=lambda r: (r.cells, r.source))
    if max_cells is None:
        return plan
    chosen: list[Relocation] = []
    spent = 0
    for relocation in plan:
        if chosen and spent + relocation.cells > max_cells:
            break
        chosen.append(relocation)
        spent += relocation.cells
    return chosen


def _cheapest_window(n_ids: int, running: Mapping[int, int], idle: Mapping[int, int], pinned: set[int]) -> int | None:
    """First id of the cheapest feasible target run, or None when pinned sequences allow none.

    Prefix sums over the ids keep this linear in n_ids: it runs at every step that finds the ids scattered.
    """
    size = len(running)
    # Per id: running cells, idle cells, running count, idle count, pinned running, pinned idle.
    columns = [[0] * (n_ids + 1) for _ in range(6)]
    for seq_id in range(n_ids):
        row = (
            running.get(seq_id, 0),
            idle.get(seq_id, 0),
            int(seq_id in running),
            int(seq_id in idle),
            int(seq_id in running and seq_id in pinned),
            int(seq_id in idle and seq_id in pinned),
        )
        for column, value in zip(columns, row, strict=True):
            column[seq_id + 1] = column[seq_id] + value
    run_cells, idle_cells, run_count, idle_count, run_pinned, idle_pinned = columns

    def inside(column: list[int], start: int) -> int:
        return column[start + size] - column[start]

    best: tuple[int, int, int] | None = None
    for start in range(n_ids - size + 1):
        if inside(run_pinned, start) != run_pinned[n_ids] or inside(idle_pinned, start):
            continue
        cost = run_cells[n_ids] - inside(run_cells, start) + inside(idle_cells, start)
        moves = run_count[n_ids] - inside(run_count, start) + inside(idle_count, start)
        candidate = (cost, moves, start)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[2]
