"""The worker's side of the protocol played by hand: read request entries, decode them, write reply events."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis

from llamaq.protocol import (
    EVENT_FIELD,
    REQUEST_FIELD,
    DoneEvent,
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


def requests_in(response: Any, keys: Keys) -> Iterator[tuple[bytes | str, Request]]:
    """Each (entry id, request) of an XREAD response on the request stream; an entry holds only the request."""
    for _key, entries in response:
        for entry_id, fields in entries:
            assert set(fields) == {REQUEST_FIELD}
            yield entry_id, decode_request(fields[REQUEST_FIELD], keys, Limits())


def event_fields(event: Event) -> dict[str, bytes]:
    """The fields of a reply stream entry carrying one event."""
    return {EVENT_FIELD: encode_event(event)}


def done(
    n: int,
    finish: FinishReason = FinishReason.STOP,
    completion_tokens: int = 0,
    *,
    usage: Usage | None = None,
    timings: Timings | None = None,
) -> DoneEvent:
    """A final event: 7 prompt tokens (2 cached) and a 10 ms request unless told otherwise."""
    return DoneEvent(n, finish, usage or Usage(7, completion_tokens, 2), timings or Timings(1.0, 2.0, 3.0, 4.0, 10.0))


def answer_events(*texts: str, finish: FinishReason = FinishReason.STOP) -> list[Event]:
    """One token event per text, then the final event counting them."""
    tokens: list[Event] = [TokenEvent(n, text, (n,)) for n, text in enumerate(texts)]
    return [*tokens, done(len(texts), finish, completion_tokens=len(texts))]


class HandWorker:
    """The worker's side of the protocol, done step by step by the test."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._last_id: bytes | str = b"0-0"

    async def poll(self, block_ms: int = 1000) -> list[Request]:
        """The requests added since the last read, waiting up to `block_ms` for one."""
        response: Any = await self.redis.xread({self.keys.requests: self._last_id}, block=block_ms)
        requests: list[Request] = []
        for entry_id, request in requests_in(response, self.keys):
            self._last_id = entry_id
            requests.append(request)
        return requests

    async def take(self, count: int = 1) -> list[Request]:
        """At least `count` new requests, failing the test after 5 s."""
        requests: list[Request] = []
        with anyio.fail_after(5):
            while len(requests) < count:
                requests += await self.poll()
        return requests

    async def send(self, request: Request, *events: Event) -> None:
        for event in events:
            await self.redis.xadd(self.keys.reply(request.client_id, request.id), event_fields(event))

    async def answer(self, request: Request, *texts: str, finish: FinishReason = FinishReason.STOP) -> None:
        await self.send(request, *answer_events(*texts, finish=finish))

    def cancel_key(self, request: Request) -> str:
        return self.keys.cancel(request.client_id, request.id)


def serve_one(plain: redis.Redis, keys: Keys, events: Callable[[Request], list[Event]]) -> threading.Thread:
    """Answer the next request of the queue from a thread, as a worker would, with a blocking connection."""

    def run() -> None:
        response: Any = plain.xread({keys.requests: "0-0"}, count=1, block=5000)
        [(_id, request)] = requests_in(response, keys)
        for event in events(request):
            plain.xadd(keys.reply(request.client_id, request.id), event_fields(event))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
