"""Who gets a sequence under contention: higher priority first and preempted last, and tenants served in turn
so one tenant's burst cannot starve another. Plain data, no model."""

from __future__ import annotations

from itertools import count

from llamaq.protocol import Request, RequestKind
from llamaq.worker.kv_cache import KvCache
from llamaq.worker.scheduler import Scheduler
from llamaq.worker.sequence import Sequence, Status

_ids = count()


def make_sequence(priority: int = 0, tenant: str | None = None, n_prompt: int = 4) -> Sequence:
    request = Request(
        id=f"req{next(_ids):08d}",
        client_id="client00",
        kind=RequestKind.COMPLETION,
        prompt="x",
        priority=priority,
        tenant=tenant,
    )
    # Distinct prompts: no shared prefix that would let one reuse another's KV.
    start = 1000 * next(_ids)
    return Sequence(request=request, prompt_tokens=list(range(start, start + n_prompt)), max_tokens=8, received_at=0)


def test_higher_priority_is_admitted_first() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=1, window=64), token_budget=16)
    low, high = make_sequence(priority=0), make_sequence(priority=5)
    scheduler.add(low)
    scheduler.add(high)
    scheduler.schedule()
    assert high.status is Status.RUNNING and low.status is Status.WAITING


def test_a_waiting_higher_priority_request_preempts_the_lowest_running_one() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=2, window=64, prefix_cache=False), token_budget=16)
    low, middle = make_sequence(priority=-1), make_sequence(priority=0)
    scheduler.add(low)
    scheduler.add(middle)
    scheduler.schedule()
    urgent = make_sequence(priority=10)
    scheduler.add(urgent)
    plan = scheduler.schedule()
    assert urgent.status is Status.RUNNING and middle.status is Status.RUNNING
    assert low.status is Status.WAITING and low.preemptions == 1
    assert plan.cleared == [urgent.seq_id], "the victim's id is cleared before the urgent one reuses it"


def test_equal_priority_never_preempts() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=1, window=64), token_budget=16)
    first, second = make_sequence(), make_sequence()
    scheduler.add(first)
    scheduler.schedule()
    scheduler.add(second)
    scheduler.schedule()
    assert first.status is Status.RUNNING and second.status is Status.WAITING


def test_tenants_take_turns_whatever_order_their_requests_arrived_in() -> None:
    scheduler = Scheduler(KvCache(n_seq_max=4, window=64), token_budget=32)
    burst = [make_sequence(tenant="busy-team") for _ in range(6)]
    quiet = [make_sequence(tenant="quiet-team") for _ in range(2)]
    for sequence in burst + quiet:
        scheduler.add(sequence)
    scheduler.schedule()
    running = [s.request.tenant for s in scheduler.running]
    assert running.count("quiet-team") == 2 and running.count("busy-team") == 2
