"""The blocking client against a real Valkey, with a thread playing the worker's part."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from llamaq.client import RequestFailed, SyncClient
from llamaq.protocol import (
    EVENT_FIELD,
    REQUEST_FIELD,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    Keys,
    Limits,
    Request,
    Timings,
    TokenEvent,
    Usage,
    decode_request,
    encode_event,
)
from llamaq.worker.embedded_valkey import EmbeddedValkey


@pytest.fixture(scope="module")
def valkey_url() -> Iterator[str]:
    with EmbeddedValkey() as server:
        yield server.url


@pytest.fixture
def keys() -> Keys:
    return Keys(queue=f"s{secrets.token_hex(4)}")


@pytest.fixture
def plain(valkey_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(valkey_url)
    yield connection
    connection.close()


def serve_one(plain: redis.Redis, keys: Keys, events: Callable[[Request], list[Event]]) -> threading.Thread:
    """Answer the next request of the queue from a thread, as a worker would."""

    def run() -> None:
        response: Any = plain.xread({keys.requests: "0-0"}, count=1, block=5000)
        [[_key, [(_id, fields)]]] = response
        request = decode_request(fields[REQUEST_FIELD], keys, Limits())
        for event in events(request):
            plain.xadd(keys.reply(request.client_id, request.id), {EVENT_FIELD: encode_event(event)})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def answer(*texts: str) -> Callable[[Request], list[Event]]:
    def events(_request: Request) -> list[Event]:
        done = DoneEvent(len(texts), FinishReason.STOP, Usage(3, len(texts)), Timings(0, 1, 2, 3, 4))
        return [*(TokenEvent(n, t, (n,)) for n, t in enumerate(texts)), done]

    return events


def test_sync_chat_returns_the_completion(valkey_url: str, keys: Keys, plain: redis.Redis) -> None:
    worker = serve_one(plain, keys, answer("Hi", " there"))
    with SyncClient.from_url(valkey_url, queue=keys.queue) as client:
        completion = client.chat([{"role": "user", "content": "hello"}], max_tokens=4)
    worker.join(5)
    assert completion.text == "Hi there" and completion.finish_reason is FinishReason.STOP


def test_sync_stream_yields_tokens_then_done(valkey_url: str, keys: Keys, plain: redis.Redis) -> None:
    serve_one(plain, keys, answer("a", "b", "c"))
    with SyncClient(valkey_url, queue=keys.queue) as client:
        events = list(client.stream_completion("abc", temperature=0.0))
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["a", "b", "c"]
    assert isinstance(events[-1], DoneEvent)


def test_sync_error_raises_request_failed(valkey_url: str, keys: Keys, plain: redis.Redis) -> None:
    serve_one(plain, keys, lambda _r: [ErrorEvent(0, ErrorCode.OVERLOADED, "queue full")])
    with SyncClient(valkey_url, queue=keys.queue) as client, pytest.raises(RequestFailed) as failure:
        client.completion("p")
    assert failure.value.code is ErrorCode.OVERLOADED


def test_sync_break_sends_the_cancel(valkey_url: str, keys: Keys, plain: redis.Redis) -> None:
    serve_one(plain, keys, lambda _r: [TokenEvent(0, "a", (1,)), TokenEvent(1, "b", (2,))])
    with SyncClient(valkey_url, queue=keys.queue) as client:
        for event in client.stream_chat([{"role": "user", "content": "hi"}]):
            assert isinstance(event, TokenEvent)
            break
        # Leaving the loop closes the generator at once, and closing it sends the cancel before returning.
        assert plain.keys(f"*{client.client.client_id}*:cancel:*")


def test_sync_cancel_by_id(valkey_url: str, keys: Keys, plain: redis.Redis) -> None:
    with SyncClient(valkey_url, queue=keys.queue) as client:
        client.cancel("0123456789abcdef")
        assert plain.exists(keys.cancel(client.client.client_id, "0123456789abcdef"))
