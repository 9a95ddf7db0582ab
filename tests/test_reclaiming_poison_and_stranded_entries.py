"""What live workers do with what a dead one left behind, with two real worker processes on one queue.

- A poison resume: a request pending on a dead worker whose reply stream holds token ids outside the
  vocabulary (an id there aborts llama.cpp in llama_token_to_piece). The worker that claims it refuses to
  resume from them and generates the answer again from the prompt; both workers stay up.
- A dead letter: an entry already delivered --max-deliveries times (each worker that took it died) is answered
  with `internal`, acked and counted instead of being served again.
- A stranded inbox: a dead worker with nothing pending on the queue but more handed-over turns in its inbox than
  the live workers have room for. Every turn is served: the dead consumer is forgotten only once its inbox is
  empty.

The dead workers are consumers that never had a heartbeat, so the test waits only the reclaimer's confirmation
(one heartbeat TTL, shortened here to FAILOVER_TTL_S).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.protocol import (
    EVENT_FIELD,
    REQUEST_FIELD,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    Keys,
    Request,
    TokenEvent,
    encode_event,
    encode_request,
)

from .conftest import (
    FAILOVER_TTL_S,
    hand_made_request,
    reply_events,
    scrape_samples,
    worker_metrics_port,
    worker_output,
    worker_process,
)

pytestmark = pytest.mark.slow

MAX_DELIVERIES = 3
FAST_FAILOVER = ("--threads", "1", "--heartbeat-ttl", str(FAILOVER_TTL_S), "--max-deliveries", str(MAX_DELIVERIES))


@pytest.fixture(scope="module")
def queue(redis_url: str) -> Iterator[tuple[Keys, list[subprocess.Popen[bytes]]]]:
    """Two worker processes on a queue of this module's own."""
    prefix = f"t{secrets.token_hex(4)}"
    with (
        worker_process(redis_url, prefix, *FAST_FAILOVER) as first,
        worker_process(redis_url, prefix, *FAST_FAILOVER) as second,
    ):
        yield Keys(prefix), [first, second]


async def test_a_poison_resume_entry_is_generated_again_and_both_workers_stay_up(
    redis: aioredis.Redis, queue: tuple[Keys, list[subprocess.Popen[bytes]]]
) -> None:
    keys, workers = queue
    request = hand_made_request("poisoned-client-1", secrets.token_hex(8), "The capital of France is", 8)
    reply = keys.reply(request.client_id, request.id)
    # What a client can write into its own reply stream: a token event whose ids are not tokens.
    await redis.xadd(reply, {EVENT_FIELD: encode_event(TokenEvent(n=0, text="x", tokens=(-7, 10**9)))})
    await leave_pending_on_ghost(redis, keys, "ghost-of-a-poisoned-worker", request)
    events = await final_events(redis, reply)
    assert all(w.poll() is None for w in workers), "\n\n".join(worker_output(w) for w in workers)
    assert [e.n for e in events] == list(range(len(events))), "numbered on after the events on the stream"
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.usage.completion_tokens == 8, done
    assert total(workers, "llamaq_resumes_refused_total") == 1


async def test_an_entry_delivered_too_often_is_answered_internal_and_counted(
    redis: aioredis.Redis, queue: tuple[Keys, list[subprocess.Popen[bytes]]]
) -> None:
    keys, workers = queue
    request = hand_made_request("deadletter-client", secrets.token_hex(8), "Tell me a story.", 8)
    reply = keys.reply(request.client_id, request.id)
    await leave_pending_on_ghost(redis, keys, "ghost-of-a-killed-worker", request, deliveries=MAX_DELIVERIES)
    events = await final_events(redis, reply)
    assert len(events) == 1 and isinstance(events[0], ErrorEvent), events
    assert events[0].code is ErrorCode.INTERNAL
    assert total(workers, "llamaq_dead_letters_total") == 1
    assert (await redis.xpending(keys.requests, keys.group))["pending"] == 0
    assert all(w.poll() is None for w in workers)


async def test_every_turn_in_a_dead_workers_inbox_is_served(
    redis: aioredis.Redis, queue: tuple[Keys, list[subprocess.Popen[bytes]]]
) -> None:
    keys, _ = queue
    ghost = "ghost-with-a-full-inbox"
    inbox = keys.inbox(ghost)
    # More turns than both live workers have room for (8 each), some read by the dead worker, some not yet.
    turns = [hand_made_request("inbox-client-001", secrets.token_hex(8), f"Turn {i}:", 2) for i in range(24)]
    await redis.xgroup_createconsumer(keys.requests, keys.group, ghost)
    await redis.xgroup_create(inbox, keys.group, id="0", mkstream=True)
    for turn in turns:
        await redis.xadd(inbox, {REQUEST_FIELD: encode_request(turn, keys)})
    await redis.xreadgroup(keys.group, ghost, {inbox: ">"}, count=6)
    with anyio.fail_after(90):
        for turn in turns:
            await final_events(redis, keys.reply(turn.client_id, turn.id))
        while await redis.exists(inbox):
            await anyio.sleep(0.2)
    consumers = {c["name"].decode() for c in await redis.xinfo_consumers(keys.requests, keys.group)}
    assert ghost not in consumers, "the dead consumer is forgotten once its inbox is empty"


async def leave_pending_on_ghost(
    redis: aioredis.Redis, keys: Keys, ghost: str, request: Request, deliveries: int = 1
) -> None:
    """Enqueue a request and have a consumer with no heartbeat (dead from the start) read it, in one transaction,
    so no live worker blocked on the stream gets it first; claimed to the same consumer until it has been
    delivered `deliveries` times."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.requests, {REQUEST_FIELD: encode_request(request, keys)})
        pipe.xreadgroup(keys.group, ghost, {keys.requests: ">"}, count=1)
        entry_id, _ = await pipe.execute()
    for _ in range(deliveries - 1):
        await redis.xclaim(keys.requests, keys.group, ghost, 0, [entry_id])


async def final_events(redis: aioredis.Redis, reply: str, timeout_s: float = 60) -> list[Event]:
    """A reply stream's events once it holds a final one."""
    with anyio.fail_after(timeout_s):
        while True:
            events = await reply_events(redis, reply)
            if events and not isinstance(events[-1], TokenEvent):
                return events
            await anyio.sleep(0.1)


def total(workers: list[subprocess.Popen[bytes]], name: str) -> float:
    """A counter summed over the workers."""
    return sum(
        value
        for worker in workers
        for (sample, _), value in scrape_samples(worker_metrics_port(worker)).items()
        if sample == name
    )
