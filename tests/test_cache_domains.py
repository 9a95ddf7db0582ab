"""Prefix reuse on plain data stays inside a cache domain (a tenant, or a client, narrowed by a cache salt):
idle and running sequences of another domain are neither continued, nor copied, nor waited for."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llamaq.protocol import Request, RequestKind
from llamaq.worker.kv_cache import KvCache
from llamaq.worker.scheduler import Scheduler
from llamaq.worker.sequence import Sequence, Status

SYSTEM = list(range(100, 140))
"""A 40-token shared prefix: long enough to be copied (MIN_COPY_TOKENS) and waited for."""


def sequence_of(tenant: str | None, prompt: list[int], name: str, salt: str | None = None) -> Sequence:
    request = Request(f"{name}0000000", "client00", RequestKind.COMPLETION, prompt="x", tenant=tenant, cache_salt=salt)
    return Sequence(request=request, prompt_tokens=list(prompt), max_tokens=8, received_at=0.0)


def step(scheduler: Scheduler) -> list[Sequence]:
    """One step as the engine loop runs it (token 7 sampled); the sequences admitted in it."""
    return step_reusing(scheduler)[0]


def step_reusing(scheduler: Scheduler) -> tuple[list[Sequence], list[tuple[Sequence, int, int | None]]]:
    """One step; the sequences admitted, and each with the positions and the copy source it was admitted with."""
    plan = scheduler.schedule()
    reused = [(s, s.n_computed, s.copy_from) for s in plan.admitted]
    for chunk in plan.chunks:
        if scheduler.record_decoded(chunk):
            chunk.sequence.generated.append(7)
    return plan.admitted, reused


def test_an_idle_sequence_is_reused_only_within_its_domain() -> None:
    kv = KvCache(n_seq_max=4, window=256)
    first = kv.admit(SYSTEM, domain="t.acme")
    assert first is not None and kv.park(first.seq_id, [*SYSTEM, 1, 2], domain="t.acme")
    other = kv.admit(SYSTEM, domain="t.globex")
    assert other is not None and other.n_cached == 0 and other.seq_id != first.seq_id
    assert kv.longest_cached_prefix(SYSTEM, {}, "t.globex") == 0
    assert kv.longest_cached_prefix(SYSTEM, {}, "t.acme") == len(SYSTEM)
    mine = kv.admit(SYSTEM, domain="t.acme")
    assert mine is not None and (mine.copy_from, mine.n_cached) == (first.seq_id, len(SYSTEM) - 1)


def test_a_running_sequence_of_another_tenant_is_not_copied() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=4, window=256), token_budget=64)
    first = sequence_of("acme", [*SYSTEM, 1], "first")
    scheduler.add(first)
    while first.prefilling or not first.generated:
        step(scheduler)
    foreign, own = sequence_of("globex", [*SYSTEM, 2], "foreign"), sequence_of("acme", [*SYSTEM, 3], "own")
    scheduler.add(foreign)
    scheduler.add(own)
    admitted = step(scheduler)
    assert foreign in admitted and own in admitted
    assert (foreign.copy_from, foreign.cached_tokens) == (None, 0)
    assert own.copy_from == first.seq_id and own.cached_tokens == len(SYSTEM)


def test_another_tenants_prefix_in_progress_does_not_hold_a_request_back() -> None:
    """Within a tenant a request waits a few steps for a shared prefix being prefilled, to copy it; across
    tenants it must not, or its delay would tell that someone is computing that very prefix."""
    scheduler = Scheduler(KvCache(n_seq_max=4, window=512), token_budget=16)
    long_prompt = [*SYSTEM, *range(300, 340)]
    first = sequence_of("acme", long_prompt, "first")
    scheduler.add(first)
    step(scheduler)
    assert first.prefilling
    foreign, own = sequence_of("globex", long_prompt, "foreign"), sequence_of("acme", long_prompt, "own")
    scheduler.add(foreign)
    scheduler.add(own)
    step(scheduler)
    assert foreign.status is Status.RUNNING and foreign.cached_tokens == 0
    assert own.status is Status.WAITING, "the same tenant waits to copy the prefix"


def test_a_cache_salt_narrows_reuse_within_a_tenant() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=4, window=256), token_budget=64)
    salted = sequence_of("acme", [*SYSTEM, 1], "salted", salt="user-1")
    scheduler.add(salted)
    while not salted.generated:
        step(scheduler)
    scheduler.release(salted, keep_cache=True)
    later = [
        sequence_of("acme", [*SYSTEM, 1], "other", salt="user-2"),
        sequence_of("acme", [*SYSTEM, 1], "unsalted"),
        sequence_of("acme", [*SYSTEM, 1], "same", salt="user-1"),
    ]
    for sequence in later:
        scheduler.add(sequence)
    step(scheduler)
    assert [s.cached_tokens for s in later] == [0, 0, len(SYSTEM)]


@settings(max_examples=150, deadline=None)
@given(
    actions=st.lists(
        st.tuples(st.sampled_from(["add", "step", "finish"]), st.sampled_from([None, "a", "b"]), st.integers(0, 3)),
        max_size=50,
    )
)
def test_whatever_the_traffic_no_request_gets_kv_from_another_domain(
    actions: list[tuple[str, str | None, int]],
) -> None:
    """Every admission that reuses KV (in place or by a copy) takes it from a sequence of its own domain."""
    scheduler = Scheduler(KvCache(n_seq_max=3, window=256), token_budget=32)
    last_domain: dict[int, str] = {}
    """The domain whose tokens each sequence id holds (the last sequence that ran in it)."""
    for index, (action, tenant, variant) in enumerate(actions):
        if action == "add":
            prompt = [*SYSTEM[: 20 + 5 * variant], variant]
            scheduler.add(sequence_of(tenant, prompt, f"s{index}"))
        elif action == "step":
            for sequence, n_cached, copy_from in step_reusing(scheduler)[1]:
                assert sequence.seq_id is not None
                domain = sequence.request.cache_domain
                if copy_from is not None:
                    assert last_domain[copy_from] == domain
                elif n_cached:
                    assert last_domain[sequence.seq_id] == domain
                last_domain[sequence.seq_id] = domain
        elif scheduler.running:
            scheduler.release(scheduler.running[variant % len(scheduler.running)], keep_cache=variant % 2 == 0)
