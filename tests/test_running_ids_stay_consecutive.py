"""Running sequences are kept on consecutive ids (per-sequence layout), so that llama.cpp decodes a step in one
micro-batch: the packing plan and the KV manager's bookkeeping, on plain data."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from llamaq.worker.id_packing import Relocation, count_runs, plan_packing
from llamaq.worker.kv_cache import KvCache


def test_runs_count_maximal_consecutive_stretches() -> None:
    assert count_runs([]) == 0
    assert count_runs([4]) == 1
    assert count_runs([3, 1, 2, 0]) == 1
    assert count_runs([0, 1, 2, 5, 6, 9]) == 3


def test_a_consecutive_running_set_is_left_alone() -> None:
    assert plan_packing(8, {2: 10, 3: 10, 4: 10}, {0: 5, 7: 5}) == []


def test_the_cheapest_window_moves_the_short_sequences_into_free_ids() -> None:
    plan = plan_packing(16, {0: 10, 1: 10, 2: 10, 5: 100, 6: 100, 9: 5}, {3: 50, 4: 7})
    assert sorted(r.source for r in plan) == [0, 1, 2]
    assert not any(r.swap for r in plan)
    assert count_runs([5, 6, 9, *(r.target for r in plan)]) == 1


def test_idle_sequences_in_the_way_are_swapped_out_not_lost() -> None:
    running, idle = {0: 10, 3: 10, 5: 10, 7: 10}, {1: 1, 2: 1, 4: 1, 6: 1}
    plan = plan_packing(8, running, idle)
    assert all(r.swap for r in plan)
    assert {r.cells for r in plan} == {11}
    assert count_runs(_after(running, plan)) == 1


def test_pinned_sequences_never_move() -> None:
    running = {0: 10, 4: 10, 5: 10}
    plan = plan_packing(8, running, {}, pinned={0})
    assert plan and all(r.source != 0 for r in plan)
    assert count_runs(_after(running, plan)) == 1
    # Pinned on both sides of a gap that only they could close: nothing to do.
    assert plan_packing(8, {0: 1, 4: 1}, {}, pinned={0, 4}) == []


def test_a_cell_budget_takes_the_cheapest_moves_first_and_at_least_one() -> None:
    running = {0: 300, 1: 300, 2: 300, 6: 40, 7: 30}
    assert [r.source for r in plan_packing(8, running, {}, max_cells=50)] == [7]
    assert len(plan_packing(8, running, {}, max_cells=1)) == 1


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_packing_always_ends_in_one_run_and_keeps_every_sequence(data: st.DataObject) -> None:
    n_ids = data.draw(st.integers(1, 40))
    states = data.draw(st.lists(st.sampled_from("rif"), min_size=n_ids, max_size=n_ids))
    running = {i: data.draw(st.integers(0, 500)) for i, s in enumerate(states) if s == "r"}
    idle = {i: data.draw(st.integers(1, 500)) for i, s in enumerate(states) if s == "i"}
    plan = plan_packing(n_ids, running, idle)
    assert count_runs(_after(running, plan)) <= 1
    sources = [r.source for r in plan]
    targets = [r.target for r in plan]
    assert len(set(sources)) == len(sources) and len(set(targets)) == len(targets)
    assert set(sources) <= set(running) and not set(targets) & set(running)
    assert all(r.swap == (r.target in idle) for r in plan)
    assert all(r.cells == running[r.source] + idle.get(r.target, 0) for r in plan)


def test_fresh_ids_go_next_to_the_running_ones() -> None:
    kv = KvCache(n_seq_max=8, window=64, prefix_cache=False)
    ids = [_admit(kv, [i, 100 + i]) for i in range(4)]
    assert ids == [0, 1, 2, 3]
    kv.free(1)
    assert _admit(kv, [9, 9]) == 1, "the gap is filled first"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_random_traffic_packed_every_round_keeps_one_run(seed: int, prefix_cache: bool) -> None:
    """Admissions, finishes (parked or freed) and packing rounds in random order: after every packing round the
    running ids form one run, and ids, idle sequences and cell counts are never lost or duplicated."""
    rng = random.Random(seed)
    kv = KvCache(n_seq_max=12, window=64, prefix_cache=prefix_cache)
    running: dict[int, list[int]] = {}
    for _ in range(60):
        action = rng.random()
        if action < 0.45 and kv.n_free:
            prompt = [rng.randrange(4), rng.randrange(50), rng.randrange(50)]
            allocation = kv.admit(prompt, running)
            if allocation is not None:
                running[allocation.seq_id] = prompt
                kv.resize(allocation.seq_id, len(prompt))
        elif action < 0.8 and running:
            seq_id = rng.choice(sorted(running))
            tokens = running.pop(seq_id)
            if not kv.park(seq_id, tokens):
                kv.free(seq_id)
        else:
            for relocation in kv.pack(pinned=set()):
                running[relocation.target] = running.pop(relocation.source)
            assert count_runs(running) <= 1
        assert set(running) == kv._running
        assert not set(running) & set(kv.cells_held())
        assert len(running) + kv.n_idle + len(kv._free) == kv.n_seq_max
        assert all(kv.ledger.length(seq_id) == len(tokens) for seq_id, tokens in running.items())


def _admit(kv: KvCache, prompt: list[int]) -> int:
    allocation = kv.admit(prompt)
    assert allocation is not None
    return allocation.seq_id


def _after(running: dict[int, int], plan: list[Relocation]) -> set[int]:
    ids = set(running)
    for relocation in plan:
        ids.remove(relocation.source)
        ids.add(relocation.target)
    return ids
