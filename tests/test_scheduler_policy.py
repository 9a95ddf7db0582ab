"""Scheduling policy on plain data: decodes first, bounded prefill chunks, ids from the pool, nothing leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaq.protocol import Request, RequestKind
from llamaq.worker.kv_cache import KvCache
from llamaq.worker.scheduler import Scheduler
from llamaq.worker.sequence import Sequence, Status


def make_sequence(n_prompt: int, name: str = "r") -> Sequence:
    request = Request(id=f"{name}0000000", client_id="client00", kind=RequestKind.COMPLETION, prompt="x")
    return Sequence(request=request, prompt_tokens=list(range(n_prompt)), max_tokens=8, received_at=0.0)


def run_plan(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    """Carry out one step the way the engine loop does, sampling token 7 where logits are wanted."""
    step = scheduler.schedule()
    # The engine clears these ids before it copies: a cleared source would leave its copy empty.
    assert not {s.copy_from for s in step.admitted} & set(step.cleared), "a copy's source is cleared first"
    plan = step.chunks
    for chunk in plan:
        if scheduler.record_decoded(chunk):
            chunk.sequence.generated.append(7)
    return [(c.sequence, len(c.tokens)) for c in plan]


def test_decodes_go_first_and_a_long_prompt_is_chunked() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=4, window=1024), token_budget=64)
    short = make_sequence(3, "a")
    scheduler.add(short)
    assert run_plan(scheduler) == [(short, 3)]
    long = make_sequence(200, "b")
    scheduler.add(long)
    assert run_plan(scheduler) == [(short, 1), (long, 63)]
    assert run_plan(scheduler) == [(short, 1), (long, 63)]
    assert long.prefilling and long.n_computed == 126


def test_admission_is_bounded_by_free_sequence_ids() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=2, window=64), token_budget=32)
    sequences = [make_sequence(4, name) for name in "abc"]
    for sequence in sequences:
        scheduler.add(sequence)
    scheduler.schedule()
    assert [s.status for s in sequences] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    assert scheduler.release(sequences[0], keep_cache=False) == 0
    scheduler.schedule()
    assert sequences[2].status is Status.RUNNING
    assert sequences[2].seq_id == 0


def test_budget_below_parallelism_is_refused() -> None:
    with pytest.raises(ValueError):
        Scheduler(KvCache(n_seq_max=8, window=64), token_budget=4)


def test_releasing_an_id_that_does_not_run_is_an_error() -> None:
    kv = KvCache(n_seq_max=2, window=8)
    with pytest.raises(ValueError):
        kv.free(0)
    with pytest.raises(ValueError):
        kv.park(1, [1, 2])


@settings(max_examples=200, deadline=None)
@given(
    n_seq_max=st.integers(1, 6),
    budget_extra=st.integers(0, 40),
    actions=st.lists(st.tuples(st.sampled_from(["add", "step", "finish"]), st.integers(1, 120)), max_size=60),
)
def test_random_workloads_keep_the_invariants(
    n_seq_max: int, budget_extra: int, actions: list[tuple[str, int]]
) -> None:
    kv = KvCache(n_seq_max=n_seq_max, window=4096)
    budget = n_seq_max + budget_extra
    scheduler = Scheduler(kv, token_budget=budget)
    for i, (action, value) in enumerate(actions):
        if action == "add":
            scheduler.add(make_sequence(value, f"s{i}"))
        elif action == "step":
            decoding = [s for s in scheduler.running if not s.prefilling]
            plan = run_plan(scheduler)
            planned = {id(s): n for s, n in plan}
            assert sum(planned.values()) <= budget
            assert len(planned) == len(plan)
            # Every decoding sequence gets its one token each step: streams never stall behind a prefill.
            assert all(planned.get(id(s)) == 1 for s in decoding)
        elif scheduler.running:
            scheduler.release(scheduler.running[value % len(scheduler.running)], keep_cache=value % 2 == 0)
        ids = [s.seq_id for s in scheduler.running]
        assert all(seq_id is not None and 0 <= seq_id < n_seq_max for seq_id in ids)
        assert len(set(ids)) == len(ids) == kv.n_used
        assert not set(ids) & set(kv.cells_held()), "an id is both running and idle"
        assert kv.n_used + kv.n_idle <= n_seq_max
        assert all(s.seq_id is None for s in scheduler.waiting)
    for sequence in list(scheduler):
        scheduler.release(sequence, keep_cache=True)
    assert kv.n_used == 0 and not scheduler.has_work


def test_a_request_sharing_a_prefix_being_prefilled_waits_to_copy_it() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=4, window=1024), token_budget=16)
    first, second, other = make_sequence(40, "a"), make_sequence(40, "b"), make_sequence(3, "c")
    second.prompt_tokens[-1] = 999  # shares 39 tokens with the first
    other.prompt_tokens = [500, 501, 502]
    for sequence in (first, second, other):
        scheduler.add(sequence)
    run_plan(scheduler)
    assert first.status is Status.RUNNING and other.status is Status.RUNNING
    assert second.status is Status.WAITING, "admitted before the shared prefix was computed"
    while first.prefilling:
        run_plan(scheduler)
    plan = scheduler.schedule()
    assert second in plan.admitted
    assert second.copy_from == first.seq_id and second.n_computed == 39


def test_a_step_never_evicts_the_source_of_a_copy_it_admits() -> None:
    # Found with two identical chat prompts in flight: the second copied a sequence evicted in the same step
    # and answered from an empty KV.
    scheduler = Scheduler(KvCache(n_seq_max=2, window=1024), token_budget=64)
    kept, other = make_sequence(30, "a"), make_sequence(30, "b")
    other.prompt_tokens = list(range(500, 530))
    for sequence in (kept, other):
        scheduler.add(sequence)
    while any(s.n_computed <= 30 for s in (kept, other)):
        run_plan(scheduler)
    source = kept.seq_id
    for sequence in (kept, other):
        scheduler.release(sequence, keep_cache=True)
    again, unrelated = make_sequence(30, "c"), make_sequence(3, "d")
    unrelated.prompt_tokens = [900, 901, 902]
    scheduler.add(again)
    scheduler.add(unrelated)
    step = scheduler.schedule()
    assert step.admitted == [again] and again.copy_from == source and again.n_computed == 29
    assert unrelated.status is Status.WAITING, "the only id left holds the KV the new sequence copies"
    assert source not in step.cleared


def test_unified_layout_preempts_the_latest_admitted_when_cells_run_out() -> None:
    kv = KvCache(n_seq_max=3, window=64, n_cells=64)
    scheduler = Scheduler(kv, token_budget=64)
    first, second = make_sequence(20, "a"), make_sequence(20, "b")
    second.prompt_tokens = [100 + t for t in range(20)]
    for sequence in (first, second):
        sequence.max_tokens = 40
        scheduler.add(sequence)
    run_plan(scheduler)
    assert kv.cells_in_use() == 40 and first.generated and second.generated
    while second.status is not Status.WAITING:
        run_plan(scheduler)
        assert kv.cells_in_use() <= 64
    # The latest admitted went back to the head of the queue with what it generated; the first goes on.
    assert scheduler.preemptions == 1 and second.n_computed == 0 and second.seq_id is None
    assert scheduler.waiting[0] is second and len(second.generated) > 1
    kept = list(second.generated)
    scheduler.release(first, keep_cache=False)
    plan = scheduler.schedule()
    assert second in plan.admitted and second.generated == kept
    assert plan.chunks[0].tokens == second.all_tokens()[: len(plan.chunks[0].tokens)]


@settings(max_examples=200, deadline=None)
@given(
    n_seq_max=st.integers(1, 5),
    actions=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "finish"]), st.integers(1, 100)), max_size=60),
)
def test_unified_layout_never_plans_more_cells_than_it_has(n_seq_max: int, actions: list[tuple[str, int]]) -> None:
    n_cells = 128
    kv = KvCache(n_seq_max=n_seq_max, window=n_cells, n_cells=n_cells)
    scheduler = Scheduler(kv, token_budget=max(n_seq_max, 32))
    for i, (action, value) in enumerate(actions):
        if action == "add":
            sequence = make_sequence(value, f"u{i}")
            sequence.max_tokens = n_cells - value  # what the worker checks: prompt plus max_tokens fit the cells
            scheduler.add(sequence)
        elif action == "step":
            run_plan(scheduler)
            for sequence in list(scheduler.running):
                if len(sequence.generated) >= sequence.max_tokens:
                    scheduler.release(sequence, keep_cache=value % 2 == 0)
        elif scheduler.running:
            scheduler.release(scheduler.running[value % len(scheduler.running)], keep_cache=value % 2 == 0)
        assert kv.cells_in_use() <= n_cells
        running_cells = sum(s.n_computed for s in scheduler.running)
        assert kv.cells_in_use() <= running_cells + sum(kv.cells_held().values())
