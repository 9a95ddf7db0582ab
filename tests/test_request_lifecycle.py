"""One worker, real model, real Valkey: every way a request can end, and the KV cache empty afterwards."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import msgpack
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client, RequestFailed
from llamaq.protocol import (
    REQUEST_FIELD,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    Keys,
    Request,
    RequestKind,
    SamplingParams,
    TokenEvent,
    decode_event,
    encode_request,
)
from llamaq.protocol.codec import EVENT_FIELD
from llamaq.worker.service import Worker

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings
from .prompts import LONG_PROMPT

pytestmark = pytest.mark.slow


@pytest.fixture
async def worker(redis_url: str, model_path: Path, prefix: str) -> Worker:
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as running:
        yield running  # type: ignore[misc]
        await wait_until_idle(running)
        assert_kv_cache_accounted(running)


@pytest.fixture
def connect(redis_url: str, prefix: str, worker: Worker) -> Client:
    """A client for the test's worker; opened in the test itself, since anyio scopes cannot span fixture tasks."""
    return Client.from_url(redis_url, prefix=prefix)


async def test_chat_streams_numbered_events_ending_in_done(connect: Client) -> None:
    async with connect as client:
        handle = await client.submit(messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
        events = [event async for event in handle]
        assert [e.n for e in events] == list(range(len(events)))
        assert all(isinstance(e, TokenEvent) for e in events[:-1])
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert done.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert done.usage.completion_tokens == sum(len(e.tokens) for e in events[:-1])  # type: ignore[union-attr]
        assert done.usage.prompt_tokens > 5 and done.timings.ttft_ms > 0


async def test_max_tokens_ends_with_length(connect: Client) -> None:
    async with connect as client:
        result = await client.completion("Count: 1, 2, 3,", max_tokens=5, temperature=0)
        assert result.finish_reason is FinishReason.LENGTH
        assert result.usage.completion_tokens == 5


async def test_ignore_eos_generates_past_the_end_to_max_tokens(connect: Client) -> None:
    question = [{"role": "user", "content": "Answer with one word: is water wet?"}]
    async with connect as client:
        short = await client.chat(question, max_tokens=60, temperature=0)
        greedy = await client.chat(question, max_tokens=60, temperature=0, ignore_eos=True)
        sampled = await client.chat(question, max_tokens=60, temperature=0.8, seed=3, ignore_eos=True)
    assert short.finish_reason is FinishReason.STOP and short.usage.completion_tokens < 60, short.text
    for result in (greedy, sampled):
        assert result.finish_reason is FinishReason.LENGTH and result.usage.completion_tokens == 60
    assert greedy.text.startswith(short.text), "the same argmax until the end-of-generation token would win"


async def test_stop_string_ends_generation_before_it(connect: Client) -> None:
    async with connect as client:
        full = await client.completion("Count: 1, 2, 3,", max_tokens=12, temperature=0)
        stop = full.text.strip()[2:4]
        assert stop, full.text
        cut = await client.completion("Count: 1, 2, 3,", max_tokens=12, temperature=0, stop=[stop])
        assert cut.finish_reason is FinishReason.STOP
        assert cut.text == full.text[: full.text.index(stop)]


async def test_same_seed_gives_same_sampled_text(connect: Client) -> None:
    async with connect as client:
        prompt = "Write a sentence about a cat."
        first = await client.chat([{"role": "user", "content": prompt}], temperature=1.0, seed=1234, max_tokens=24)
        again = await client.chat([{"role": "user", "content": prompt}], temperature=1.0, seed=1234, max_tokens=24)
        others = [
            (await client.chat([{"role": "user", "content": prompt}], temperature=1.0, seed=s, max_tokens=24)).text
            for s in (1, 2, 3)
        ]
        assert first.text == again.text
        assert any(text != first.text for text in others), "sampling ignored the seed"


async def test_cancel_mid_stream_frees_the_sequence(connect: Client, worker: Worker) -> None:
    async with connect as client:
        handle = await client.submit(prompt=LONG_PROMPT, max_tokens=400, temperature=0)
        events = []
        async for event in handle:
            events.append(event)
            if len(events) == 3:
                await handle.cancel()
        final = events[-1]
        assert isinstance(final, DoneEvent) and final.finish_reason is FinishReason.CANCELLED
        assert final.usage.completion_tokens < 400
        await wait_until_idle(worker, timeout_s=5)
        assert_kv_cache_accounted(worker)


async def test_prompt_longer_than_the_window_is_refused(connect: Client) -> None:
    async with connect as client:
        with pytest.raises(RequestFailed) as caught:
            await client.completion(LONG_PROMPT * 3, max_tokens=10)
        assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED


async def test_prompt_plus_max_tokens_over_the_window_is_refused(connect: Client) -> None:
    async with connect as client:
        with pytest.raises(RequestFailed) as caught:
            await client.completion(LONG_PROMPT, max_tokens=1000)
        assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED


async def test_deadline_expired_in_the_queue(redis_url: str, prefix: str, worker: Worker) -> None:
    async with Client.from_url(redis_url, prefix=prefix) as client:
        # Fill every sequence and the waiting room with long generations, then send one that cannot wait.
        blockers = [await client.submit(prompt=LONG_PROMPT, max_tokens=200, temperature=0) for _ in range(8)]
        late = await client.submit(prompt="Hello", max_tokens=4, deadline_s=0.3)
        events = [event async for event in late]
        for blocker in blockers:
            await blocker.cancel()
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].code is ErrorCode.DEADLINE_EXCEEDED


async def test_deadline_during_generation_stops_the_stream(connect: Client) -> None:
    async with connect as client:
        handle = await client.submit(prompt="Count to 500: 1, 2, 3,", max_tokens=500, temperature=0, deadline_s=1.5)
        started = time.monotonic()
        events = [event async for event in handle]
        assert isinstance(events[-1], ErrorEvent) and events[-1].code is ErrorCode.DEADLINE_EXCEEDED
        assert any(isinstance(e, TokenEvent) for e in events)
        assert time.monotonic() - started < 30


async def test_cancel_before_start_answers_cancelled(redis_url: str, prefix: str, worker: Worker) -> None:
    async with Client.from_url(redis_url, prefix=prefix) as client:
        blockers = [await client.submit(prompt=LONG_PROMPT, max_tokens=200, temperature=0) for _ in range(8)]
        queued = await client.submit(prompt="Hello", max_tokens=4)
        await queued.cancel()
        events = [event async for event in queued]
        for blocker in blockers:
            await blocker.cancel()
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason is FinishReason.CANCELLED


MALFORMED_BODIES: list[tuple[str, dict[str, object]]] = [
    ("wrong-version", {"v": 99}),
    ("unknown-kind", {"kind": "embedding"}),
    ("bad-params", {"params": {"temperature": "hot"}}),
    ("missing-messages", {"messages": None}),
    ("negative-max-tokens", {"params": {"max_tokens": -5}}),
    ("forged-reply", {"reply": "elsewhere:stream"}),
]


async def test_malformed_entries_get_errors_and_others_are_still_served(
    redis_url: str, prefix: str, worker: Worker, redis: aioredis.Redis
) -> None:
    keys = Keys(prefix=prefix)
    client_id = "malformedclient01"
    replies = []
    for i, (_name, change) in enumerate(MALFORMED_BODIES):
        request_id = f"bad{i:02d}xxxxxxxxxxxxxxxx"
        body: dict[str, object] = {
            "v": 1,
            "id": request_id,
            "client": client_id,
            "reply": keys.reply(client_id, request_id),
            "kind": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "params": {},
            "created": time.time(),
        }
        body.update({k: v for k, v in change.items() if v is not None})
        body = {k: v for k, v in body.items() if not (k in change and change[k] is None)}
        await redis.xadd(keys.requests, {REQUEST_FIELD: msgpack.packb(body)})
        replies.append(keys.reply(client_id, request_id))
    # Unidentifiable junk: not msgpack, no request field, a bare list. Acked, never answered, never fatal.
    await redis.xadd(keys.requests, {REQUEST_FIELD: b"\xc1\xc1 junk"})
    await redis.xadd(keys.requests, {"other": "field"})
    await redis.xadd(keys.requests, {REQUEST_FIELD: msgpack.packb([1, 2])})
    async with Client.from_url(redis_url, prefix=prefix) as client:
        good = await client.completion("The capital of France is", max_tokens=5, temperature=0)
    assert good.usage.completion_tokens == 5
    for reply in replies:
        entries = await redis.xrange(reply)
        assert len(entries) == 1, reply
        event = decode_event(entries[0][1][EVENT_FIELD])
        assert isinstance(event, ErrorEvent) and event.code is ErrorCode.INVALID_REQUEST
        assert await redis.ttl(reply) > 0, "error replies must expire"
    await anyio.sleep(0.2)
    pending = await redis.xpending(keys.requests, keys.group)
    assert pending["pending"] == 0, "every entry, malformed or not, is acked"
    assert await redis.xlen(keys.requests) == 0


async def test_two_clients_may_use_the_same_request_id(redis: aioredis.Redis, prefix: str, worker: Worker) -> None:
    """Ids are chosen by clients, so only (client, id) identifies a request; both must be served."""
    keys = Keys(prefix=prefix)
    shared_id = "sameid0000000000"
    clients = ["clientone0000000", "clienttwo0000000"]
    for client_id in clients:
        request = Request(
            id=shared_id,
            client_id=client_id,
            kind=RequestKind.COMPLETION,
            prompt="The capital of France is",
            params=SamplingParams(max_tokens=4, temperature=0),
        )
        await redis.xadd(keys.requests, {REQUEST_FIELD: encode_request(request, keys)})
    for client_id in clients:
        events = await read_until_final(redis, keys.reply(client_id, shared_id), timeout_s=60)
        assert isinstance(events[-1], DoneEvent), (client_id, events[-1])
        assert events[-1].usage.completion_tokens == 4


async def read_until_final(redis: aioredis.Redis, reply: str, timeout_s: float) -> list[Event]:
    """Every event on a reply stream up to its final one; fails the test if none comes in time."""
    events: list[Event] = []
    last: bytes | str = "0"
    with anyio.fail_after(timeout_s):
        while not events or isinstance(events[-1], TokenEvent):
            for _key, entries in await redis.xread({reply: last}, block=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    events.append(decode_event(fields[EVENT_FIELD]))
    return events
