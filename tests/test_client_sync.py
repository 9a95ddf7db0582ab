"""The blocking client against a real Valkey, with a thread playing the worker's part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from llamaq.client import RequestFailed, SyncClient
from llamaq.protocol import DoneEvent, ErrorCode, ErrorEvent, FinishReason, Keys, TokenEvent

from .hand_worker import answer_events, serve_one


@pytest.fixture
def plain(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def test_sync_chat_returns_the_completion(redis_url: str, keys: Keys, plain: redis.Redis) -> None:
    worker = serve_one(plain, keys, lambda _r: answer_events("Hi", " there"))
    with SyncClient.from_url(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        completion = client.chat([{"role": "user", "content": "hello"}], max_tokens=4)
    worker.join(5)
    assert completion.text == "Hi there" and completion.finish_reason is FinishReason.STOP


def test_sync_stream_yields_tokens_then_done(redis_url: str, keys: Keys, plain: redis.Redis) -> None:
    serve_one(plain, keys, lambda _r: answer_events("a", "b", "c"))
    with SyncClient(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        events = list(client.stream_completion("abc", temperature=0.0))
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["a", "b", "c"]
    assert isinstance(events[-1], DoneEvent)


def test_sync_error_raises_request_failed(redis_url: str, keys: Keys, plain: redis.Redis) -> None:
    serve_one(plain, keys, lambda _r: [ErrorEvent(0, ErrorCode.OVERLOADED, "queue full")])
    with SyncClient(redis_url, prefix=keys.prefix, queue=keys.queue) as client, pytest.raises(RequestFailed) as failure:
        client.completion("p")
    assert failure.value.code is ErrorCode.OVERLOADED


def test_sync_break_sends_the_cancel(redis_url: str, keys: Keys, plain: redis.Redis) -> None:
    serve_one(plain, keys, lambda _r: [TokenEvent(0, "a", (1,)), TokenEvent(1, "b", (2,))])
    with SyncClient(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        for event in client.stream_chat([{"role": "user", "content": "hi"}]):
            assert isinstance(event, TokenEvent)
            break
        # Leaving the loop closes the generator at once, and closing it sends the cancel before returning.
        assert plain.keys(f"*{client.client.client_id}*:cancel:*")


def test_sync_cancel_by_id(redis_url: str, keys: Keys, plain: redis.Redis) -> None:
    with SyncClient(redis_url, prefix=keys.prefix, queue=keys.queue) as client:
        client.cancel("0123456789abcdef")
        assert plain.exists(keys.cancel(client.client.client_id, "0123456789abcdef"))
