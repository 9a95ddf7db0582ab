"""The order of sequence ids in the batches that reach llama_decode, as llama.cpp receives them.

With per-sequence KV streams llama.cpp cuts a batch into one micro-batch per run of consecutive sequence ids in
batch order, each a full pass over the weights (issue 18; docs/kv-layouts.md), so a decode step is fastest when
its ids are ascending and consecutive. The engine-limit section records what each decode got: it wraps
`llama_cpp.llama_decode` (the engine and the bare loop look it up per call) and reads the batch's seq_id array.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import combinations, pairwise
from typing import Any

import llama_cpp

BatchOrder = tuple[int, tuple[int, ...]]
"""One llama_decode: its token count and its sequence ids in batch order, each once, as first seen."""


@contextmanager
def recorded_batch_order() -> Iterator[list[BatchOrder]]:
    """Record every llama_decode made while the block runs (a few microseconds per call)."""
    original: Callable[..., Any] = llama_cpp.llama_decode
    calls: list[BatchOrder] = []

    def recording(ctx: Any, batch: Any) -> Any:
        n = int(batch.n_tokens)
        seen: dict[int, None] = {}
        for i in range(n):
            seen.setdefault(int(batch.seq_id[i][0]), None)
        calls.append((n, tuple(seen)))
        return original(ctx, batch)

    llama_cpp.llama_decode = recording
    try:
        yield calls
    finally:
        llama_cpp.llama_decode = original


def order_summary(calls: list[BatchOrder], n_sequences: int) -> dict[str, Any]:
    """How ordered the batches were: decode steps of all n sequences (one token each) apart from the rest."""
    full = [ids for n, ids in calls if n == n_sequences and len(ids) == n_sequences]
    other = [ids for n, ids in calls if not (n == n_sequences and len(ids) == n_sequences)]
    orders = Counter(full)
    return {
        "decode_steps": len(full),
        "decode_steps_ascending": sum(_ascending(ids) for ids in full),
        "decode_inversion_share": round(sum(inversion_share(ids) for ids in full) / len(full), 3) if full else None,
        "decode_steps_one_run": sum(id_runs(ids) == 1 for ids in full),
        "decode_id_runs_mean": round(sum(id_runs(ids) for ids in full) / len(full), 2) if full else None,
        "other_steps": len(other),
        "other_steps_ascending": sum(_ascending(ids) for ids in other),
        "ids_used": sorted({i for _n, ids in calls for i in ids}),
        "decode_orders": [{"ids": list(ids), "steps": steps} for ids, steps in orders.most_common(3)],
    }


def inversion_share(ids: tuple[int, ...]) -> float:
    """Share of id pairs listed out of ascending order: 0 sorted, 1 reversed, about 0.5 shuffled."""
    pairs = len(ids) * (len(ids) - 1) // 2
    if not pairs:
        return 0.0
    return sum(a > b for a, b in combinations(ids, 2)) / pairs


def id_runs(ids: tuple[int, ...]) -> int:
    """Runs of consecutive ascending ids in batch order: (0, 1, 2) is one, (0, 2, 3) two, (2, 1, 0) three."""
    return sum(1 for i, seq_id in enumerate(ids) if i == 0 or seq_id != ids[i - 1] + 1)


def _ascending(ids: tuple[int, ...]) -> bool:
    return all(a < b for a, b in pairwise(ids))
