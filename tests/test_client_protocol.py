"""The async client against a real Valkey, with the test playing the worker's part by hand."""

from __future__ import annotations

import random
import time
from contextlib import aclosing
from typing import Any, cast

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client, MessageLike, RequestFailed, SamplingKwargs
from llamaq.protocol import (
    EVENT_FIELD,
    ChatMessage,
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
    Usage,
    encode_event,
)

from .hand_worker import HandWorker, answer_events, done


@pytest.fixture
def worker(redis: aioredis.Redis, keys: Keys) -> HandWorker:
    return HandWorker(redis, keys)


async def eventually(check: Any, timeout: float = 3.0) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.01)


async def test_chat_request_entry_follows_the_protocol(redis_url: str, keys: Keys, worker: HandWorker) -> None:
    messages: list[MessageLike] = [{"role": "system", "content": "be brief"}, ChatMessage("user", "hi")]
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue, client_id="client-0001") as client:
        before = time.time()
        handle = await client.submit(
            messages=messages, max_tokens=64, temperature=0.7, seed=1, stop="END", top_k=10, deadline_s=30.0
        )
        [request] = await worker.take()
        assert request.id == handle.id and len(request.id) == 32
        assert request.client_id == "client-0001"
        assert request.kind is RequestKind.CHAT
        assert request.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
        assert request.params == SamplingParams(max_tokens=64, temperature=0.7, seed=1, stop=("END",), top_k=10)
        assert before <= request.created <= time.time()
        assert request.deadline == pytest.approx(request.created + 30.0)
        await handle.aclose()


async def test_completion_request_carries_the_prompt(redis_url: str, keys: Keys, worker: HandWorker) -> None:
    async with (
        Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client,
        await client.submit(prompt="Once upon", stop=["\n", "."]) as handle,
    ):
        [request] = await worker.take()
        await worker.answer(request, "a", " time")
        completion = await handle.result()
    assert request.kind is RequestKind.COMPLETION and request.prompt == "Once upon"
    assert request.params.stop == ("\n", ".") and request.deadline is None and request.params.seed is None
    assert completion.text == "a time"


async def test_events_arrive_in_order_and_the_reply_stream_is_deleted(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        seen: list[Event] = []

        async def consume() -> None:
            async for event in client.stream_chat([{"role": "user", "content": "count"}]):
                seen.append(event)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consume)
            [request] = await worker.take()
            await worker.answer(request, "one", " two", "", " three")
        reply_key = worker.keys.reply(request.client_id, request.id)
        await eventually(lambda: _absent(redis, reply_key))
    assert [e.text for e in seen if isinstance(e, TokenEvent)] == ["one", " two", "", " three"]
    assert [e.n for e in seen] == [0, 1, 2, 3, 4]
    assert isinstance(seen[-1], DoneEvent) and seen[-1].usage.completion_tokens == 4


async def test_chat_returns_the_whole_completion(redis_url: str, keys: Keys, worker: HandWorker) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client, anyio.create_task_group() as tasks:

        async def reply() -> None:
            [request] = await worker.take()
            await worker.answer(request, "Hel", "lo", finish=FinishReason.LENGTH)

        tasks.start_soon(reply)
        completion = await client.chat([ChatMessage("user", "hi")], max_tokens=2)
    assert completion.text == "Hello"
    assert completion.finish_reason is FinishReason.LENGTH
    assert completion.usage == Usage(7, 2, 2)
    assert completion.timings.total_ms == 10.0
    assert len(completion.request_id) == 32


async def test_duplicate_events_are_dropped(redis_url: str, keys: Keys, worker: HandWorker) -> None:
    async with (
        Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client,
        await client.submit(prompt="p") as handle,
    ):
        [request] = await worker.take()
        a, b, c = (TokenEvent(n, text, (n,)) for n, text in enumerate("abc"))
        await worker.send(request, a, b, b, a, c, c, done(3))
        completion = await handle.result()
    assert completion.text == "abc"


async def test_a_gap_in_events_fails_the_request_as_internal(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        async with await client.submit(prompt="p") as handle:
            [request] = await worker.take()
            await worker.send(request, TokenEvent(0, "a", (1,)), TokenEvent(2, "c", (3,)))
            with pytest.raises(RequestFailed) as failure:
                await handle.result()
        # The client gave up on the request, so the worker is asked to stop it too.
        await eventually(lambda: redis.exists(worker.cancel_key(request)))
    assert failure.value.code is ErrorCode.INTERNAL and failure.value.request_id == request.id


async def test_an_error_event_raises_request_failed_after_the_tokens(
    redis_url: str, keys: Keys, worker: HandWorker
) -> None:
    texts: list[str] = []
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client, anyio.create_task_group() as tasks:

        async def reply() -> None:
            [request] = await worker.take()
            await worker.send(
                request,
                TokenEvent(0, "x", (1,)),
                ErrorEvent(1, ErrorCode.CONTEXT_LENGTH_EXCEEDED, "prompt too long"),
                TokenEvent(2, "never", (2,)),
            )

        tasks.start_soon(reply)
        with pytest.raises(RequestFailed) as failure:
            async for event in client.stream_completion("long"):
                assert isinstance(event, TokenEvent)
                texts.append(event.text)
    assert texts == ["x"]
    assert failure.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and failure.value.message == "prompt too long"


async def test_a_cancelled_finish_is_a_normal_return(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        handle = await client.submit(prompt="p")
        [request] = await worker.take()
        await handle.cancel()
        assert await redis.ttl(worker.cancel_key(request)) > 3500
        await worker.answer(request, "partial", finish=FinishReason.CANCELLED)
        completion = await handle.result()
    assert completion.finish_reason is FinishReason.CANCELLED and completion.text == "partial"


async def test_cancel_by_id_sets_the_cancel_key(redis_url: str, keys: Keys, redis: aioredis.Redis) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        await client.cancel("abcdef0123456789")
        key = client.keys.cancel(client.client_id, "abcdef0123456789")
        assert await redis.get(key) == b"1"
        assert 3500 < await redis.ttl(key) <= 3600


async def test_closing_a_stream_early_sends_the_cancel(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        async with anyio.create_task_group() as tasks:

            async def reply() -> None:
                [request] = await worker.take()
                await worker.send(request, TokenEvent(0, "a", (1,)), TokenEvent(1, "b", (2,)))

            tasks.start_soon(reply)
            async with aclosing(client.stream_chat([{"role": "user", "content": "hi"}])) as events:
                async for _event in events:
                    break
        [cancel_key] = await redis.keys(f"*{client.client_id}*:cancel:*")
        # The worker's final event for the cancelled request is still read, then its stream deleted.
        request = Request(cast(bytes, cancel_key).decode().rsplit(":", 1)[-1], client.client_id, RequestKind.CHAT)
        await worker.send(request, done(2, FinishReason.CANCELLED))
        await eventually(lambda: _absent(redis, worker.keys.reply(client.client_id, request.id)))


async def test_breaking_out_of_a_stream_sends_the_cancel(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        async with anyio.create_task_group() as tasks:

            async def reply() -> None:
                [request] = await worker.take()
                await worker.send(request, TokenEvent(0, "a", (1,)))

            tasks.start_soon(reply)
            async for _event in client.stream_completion("p"):
                break
        # A bare break leaves the generator to the event loop's finaliser, which closes it soon after.
        await eventually(lambda: _count(redis, f"*{client.client_id}*:cancel:*"))


async def test_a_cancelled_consumer_task_sends_the_cancel(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        first_token = anyio.Event()

        async def consume() -> None:
            async for _event in client.stream_chat([{"role": "user", "content": "hi"}]):
                first_token.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consume)
            [request] = await worker.take()
            await worker.send(request, TokenEvent(0, "a", (1,)))
            await first_token.wait()
            tasks.cancel_scope.cancel()
        assert await redis.exists(worker.cancel_key(request))


async def test_leaving_the_client_cancels_unfinished_requests(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        await client.submit(prompt="never read")
        [request] = await worker.take()
    assert await redis.exists(worker.cancel_key(request))
    assert not await redis.exists(client.wake_key)


async def test_a_missed_deadline_fails_locally_and_cancels(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue, deadline_grace_s=0.05) as client:
        started = time.monotonic()
        with pytest.raises(RequestFailed) as failure:
            await client.completion("slow", deadline_s=0.1)
        assert time.monotonic() - started < 2.0
        [request] = await worker.take()
        assert await redis.exists(worker.cancel_key(request))
    assert failure.value.code is ErrorCode.DEADLINE_EXCEEDED


async def test_many_requests_share_one_blocked_reader(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    results: dict[str, str] = {}
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        handles = [await client.submit(prompt=f"prompt {i}") for i in range(20)]
        requests = await worker.take(20)
        # Every in-flight reply stream is waited on by one blocked XREAD, not one per request.
        await eventually(lambda: _blocked_clients(redis, 1))

        async def collect(index: int) -> None:
            results[handles[index].id] = (await handles[index].result()).text

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(collect, i)
            pending = {r.id: _answer_events(r) for r in requests}
            rng = random.Random(0)
            while pending:
                request_id = rng.choice(sorted(pending))
                request = next(r for r in requests if r.id == request_id)
                await worker.send(request, pending[request_id].pop(0))
                if not pending[request_id]:
                    del pending[request_id]
    assert results == {r.id: f"answer to {r.prompt}" for r in requests}


async def test_the_reader_survives_a_dropped_connection(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with (
        Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client,
        await client.submit(prompt="p") as handle,
    ):
        [request] = await worker.take()
        await eventually(lambda: _blocked_clients(redis, 1))
        clients = await redis.client_list()
        [reader] = [c for c in clients if c.get("cmd") == "xread"]
        await redis.client_kill_filter(_id=reader["id"])
        await worker.answer(request, "still", " here")
        completion = await handle.result()
    assert completion.text == "still here"


async def test_a_malformed_event_fails_only_its_request(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        bad, good = await client.submit(prompt="bad"), await client.submit(prompt="good")
        requests = {r.prompt: r for r in await worker.take(2)}
        await redis.xadd(worker.keys.reply(client.client_id, bad.id), {EVENT_FIELD: b"\xc1garbage"})
        await worker.answer(requests["good"], "fine")
        with pytest.raises(RequestFailed) as failure:
            await bad.result()
        assert (await good.result()).text == "fine"
    assert failure.value.code is ErrorCode.INTERNAL


async def test_unknown_options_and_missing_prompt_are_refused(redis_url: str, keys: Keys) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        with pytest.raises(TypeError):
            await client.submit(prompt="p", **cast(Any, {"temprature": 0.5}))
        with pytest.raises(TypeError):
            await client.submit()
        with pytest.raises(TypeError):
            await client.submit(prompt="p", messages=[ChatMessage("user", "x")])


def test_sampling_keywords_cover_every_sampling_param() -> None:
    assert set(SamplingKwargs.__annotations__) == set(SamplingParams.__dataclass_fields__)


def test_from_url_falls_back_to_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    assert Client.from_url()._url == "redis://example:6379/0"
    monkeypatch.delenv("REDIS_URL")
    with pytest.raises(ValueError, match="REDIS_URL"):
        Client.from_url()
    with pytest.raises(ValueError, match="client id"):
        Client("redis://x", client_id="bad{id}")


def _answer_events(request: Request) -> list[Event]:
    words = ["answer", " to", " ", *request.prompt.partition(" ")[::2]]
    words.insert(4, " ")
    return answer_events(*words)


async def _absent(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


async def _count(redis: aioredis.Redis, pattern: str) -> bool:
    return bool(await redis.keys(pattern))


async def _blocked_clients(redis: aioredis.Redis, count: int) -> bool:
    info = await redis.info("clients")
    assert info["blocked_clients"] <= count
    return bool(info["blocked_clients"] == count)


async def test_a_dead_reader_fails_waiting_requests(redis_url: str, keys: Keys, redis: aioredis.Redis) -> None:
    async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        handle = await client.submit(prompt="p")
        await eventually(lambda: _blocked_clients(redis, 1))
        # A wake key of the wrong type makes the reader's next XREAD fail with a server error.
        await redis.delete(client.wake_key)
        await redis.set(client.wake_key, "not a stream")
        await redis.xadd(client.keys.reply(client.client_id, handle.id), {EVENT_FIELD: encode_event(done(0))})
        with pytest.raises(RequestFailed) as failure:
            await handle.result()
        with pytest.raises(RequestFailed):
            await client.submit(prompt="again")
    assert failure.value.code is ErrorCode.INTERNAL and "WRONGTYPE" in failure.value.message


async def test_errors_leave_the_client_unwrapped(redis_url: str, keys: Keys, worker: HandWorker) -> None:
    with pytest.raises(RequestFailed):
        async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
            handle = await client.submit(prompt="p")
            [request] = await worker.take()
            await worker.send(request, ErrorEvent(0, ErrorCode.OVERLOADED, "busy"))
            await handle.result()
    with pytest.raises(KeyError):
        async with Client(redis_url, prefix=keys.prefix, queue=keys.queue):
            raise KeyError("not an ExceptionGroup")


async def test_a_timeout_around_the_client_leaves_cleanly(
    redis_url: str, keys: Keys, redis: aioredis.Redis, worker: HandWorker
) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with Client(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
            await client.chat([{"role": "user", "content": "nobody answers"}])
    assert scope.cancelled_caught
    [request] = await worker.take()
    assert await redis.exists(worker.cancel_key(request))
