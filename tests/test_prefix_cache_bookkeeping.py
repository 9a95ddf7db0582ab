"""The prefix cache's bookkeeping on plain data: longest-prefix reuse, LRU eviction, nothing counted twice."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llamaq.worker.kv_cache import Allocation, KvCache, common_prefix_length


def test_finished_sequence_is_reused_for_the_longest_shared_prefix() -> None:
    kv = KvCache(n_seq_max=3, window=100)
    a, b = kv.admit([1, 2, 3, 4]), kv.admit([9, 9])
    assert a is not None and b is not None
    assert kv.park(a.seq_id, [1, 2, 3, 4, 5]) and kv.park(b.seq_id, [9, 9, 9])
    again = kv.admit([1, 2, 3, 7, 7])
    assert again == Allocation(seq_id=a.seq_id, n_cached=3)
    assert kv.cells_held() == {b.seq_id: 3}


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    kv = KvCache(n_seq_max=1, window=100)
    first = kv.admit([5, 6, 7])
    assert first is not None and kv.park(first.seq_id, [5, 6, 7, 8])
    assert kv.admit([5, 6, 7]) == Allocation(seq_id=first.seq_id, n_cached=2)


def test_free_ids_go_before_evicting_and_eviction_is_least_recently_used() -> None:
    kv = KvCache(n_seq_max=3, window=100)
    ids = [kv.admit([i]) for i in (1, 2, 3)]
    assert all(ids) and kv.admit([4]) is None
    for allocation, tokens in zip(ids, ([1, 1], [2, 2], [3, 3]), strict=True):
        assert allocation is not None
        kv.park(allocation.seq_id, tokens)
    oldest = ids[0]
    assert oldest is not None
    evicting = kv.admit([8])
    assert evicting == Allocation(seq_id=oldest.seq_id, n_cached=0)
    assert len(kv.cells_held()) == 2


def test_with_the_cache_off_nothing_is_parked_or_copied() -> None:
    kv = KvCache(n_seq_max=2, window=100, prefix_cache=False)
    allocation = kv.admit([1, 2])
    assert allocation is not None
    assert not kv.park(allocation.seq_id, [1, 2])
    kv.free(allocation.seq_id)
    assert kv.cells_held() == {} and kv.n_free == 2
    shared = list(range(40))
    running = kv.admit(shared)
    assert running is not None
    second = kv.admit(shared, {running.seq_id: shared})
    assert second is not None and (second.n_cached, second.copy_from) == (0, None)


def test_a_copy_source_is_not_evicted_in_the_round_that_copies_it() -> None:
    # The engine clears a round's evicted ids before it copies: evicting the source empties the copy.
    kv = KvCache(n_seq_max=2, window=100)
    first, second = kv.admit(list(range(20))), kv.admit(list(range(500, 520)))
    assert first is not None and second is not None
    kv.park(first.seq_id, list(range(24)))
    kv.park(second.seq_id, list(range(500, 524)))
    copying = kv.admit(list(range(20)))
    assert copying == Allocation(seq_id=second.seq_id, n_cached=19, copy_from=first.seq_id)
    assert kv.is_copy_source(first.seq_id)
    assert kv.admit([900, 901]) is None, "the only idle id is the source of a copy not yet made"
    assert [e.seq_id for e in kv.take_evicted()] == [second.seq_id]
    kv.end_round()
    later = kv.admit([900, 901])
    assert later == Allocation(seq_id=first.seq_id, n_cached=0)


def test_a_preempted_copy_releases_its_source() -> None:
    kv = KvCache(n_seq_max=2, window=100)
    source = kv.admit(list(range(30)))
    assert source is not None
    kv.park(source.seq_id, list(range(30)))
    copying = kv.admit([*range(25), 7])
    assert copying is not None and copying.copy_from == source.seq_id
    kv.free(copying.seq_id)  # preempted before the engine copied anything
    assert not kv.is_copy_source(source.seq_id)


@settings(max_examples=300, deadline=None)
@given(
    n_seq_max=st.integers(1, 5),
    actions=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(0, 10)),
        max_size=60,
    ),
)
def test_random_admit_park_free_keep_the_invariants(n_seq_max: int, actions: list[tuple[bool, list[int], int]]) -> None:
    kv = KvCache(n_seq_max=n_seq_max, window=64)
    running: dict[int, list[int]] = {}
    for admit, tokens, choice in actions:
        if admit:
            idle_before = kv.cells_held()
            allocation = kv.admit(tokens)
            if allocation is None:
                assert len(running) == n_seq_max
                continue
            assert allocation.seq_id not in running and 0 <= allocation.seq_id < n_seq_max
            assert 0 <= allocation.n_cached < len(tokens)
            if allocation.n_cached:
                # Reuse only ever comes from an idle sequence that really holds that prefix.
                assert allocation.seq_id in idle_before
            running[allocation.seq_id] = tokens
        elif running:
            seq_id = sorted(running)[choice % len(running)]
            tokens = running.pop(seq_id)
            if choice % 3 == 0:
                kv.free(seq_id)
            else:
                assert kv.park(seq_id, [*tokens, choice])
        assert kv.n_used == len(running)
        assert not set(running) & set(kv.cells_held())
        # Every id is exactly one of running, idle or free (n_free counts idle ones as evictable).
        assert kv.n_used + kv.n_free == n_seq_max


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


def test_evicting_every_idle_sequence_frees_their_ids() -> None:
    kv = KvCache(n_seq_max=3, window=100)
    allocations = [kv.admit([i, i]) for i in range(3)]
    for allocation in allocations[:2]:
        assert allocation is not None and kv.park(allocation.seq_id, [7, 7, 7])
    assert sorted(kv.evict_idle()) == sorted(a.seq_id for a in allocations[:2] if a is not None)
    assert kv.cells_held() == {} and kv.n_used == 1 and kv.n_free == 2


def test_ids_evicted_for_an_admission_that_then_fails_are_still_reported() -> None:
    """Found by the unified soak: evictions made while trying to admit leaked their cells when admission failed."""
    kv = KvCache(n_seq_max=3, window=100, n_cells=100)
    big = kv.admit(list(range(60)))
    small = kv.admit([500, 501])
    assert big is not None and small is not None
    kv.resize(big.seq_id, 60)
    kv.resize(small.seq_id, 2)
    assert kv.park(small.seq_id, [500, 501])
    kv.take_evicted()
    assert kv.admit([900 + i for i in range(50)]) is None  # 60 running + 50 new > 100, even after evicting
    assert [e.seq_id for e in kv.take_evicted()] == [small.seq_id]
    assert kv.cells_in_use() == 60
