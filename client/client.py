"""Async client: adds requests to a queue's stream and reads every reply stream of one client with one XREAD."""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias, TypedDict, Unpack

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llamaq.protocol import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE,
    EVENT_FIELD,
    REQUEST_FIELD,
    ChatMessage,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    Keys,
    ProtocolError,
    Request,
    RequestKind,
    SamplingParams,
    Timings,
    TokenEvent,
    Usage,
    decode_event,
    encode_request,
    is_valid_id,
)

CANCEL_TTL_S = 3600
WAKE_TTL_S = 3600
# Best-effort Redis calls made while unwinding (auto-cancel, close) must not hang a cancelled task.
CLEANUP_TIMEOUT_S = 2.0

MessageLike: TypeAlias = ChatMessage | Mapping[str, str]


class SamplingKwargs(TypedDict, total=False):
    """Keyword form of `SamplingParams`; `stop` may also be one string or any sequence."""

    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    stop: str | Sequence[str]
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    repeat_last_n: int


class RequestOptions(SamplingKwargs, total=False):
    """Sampling keywords plus `deadline_s`, seconds from now after which the answer is worthless."""

    deadline_s: float | None


class RequestFailed(Exception):
    """A request that ended with an `error` event (or failed on the client side)."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Completion:
    """The whole answer to one request."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    request_id: str


class Client:
    """Async client for one queue; use as `async with Client.from_url(url) as client`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
        block_ms: int = 2000,
        deadline_grace_s: float = 5.0,
        drain_s: float = 30.0,
    ) -> None:
        self.client_id = client_id or secrets.token_hex(8)
        if not is_valid_id(self.client_id):
            raise ValueError(f"client id {self.client_id!r} must be 8 to 64 characters of [A-Za-z0-9_-]")
        self.keys = Keys(prefix=prefix, queue=queue)
        self.wake_key = self.keys.wake(self.client_id)
        self._url = url
        self._block_ms = block_ms
        # A worker reports a missed deadline itself; the grace lets that report win over the local timer.
        self._deadline_grace_s = deadline_grace_s
        self._drain_s = drain_s
        self._inflight: dict[str, _Inflight] = {}
        self._failure: str | None = None
        self._redis: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._tasks: TaskGroup | None = None

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
    ) -> Client:
        """A client for `url`, or for $REDIS_URL when url is None."""
        return cls(resolve_url(url), prefix=prefix, queue=queue, client_id=client_id)

    async def __aenter__(self) -> Client:
        self._redis = aioredis.Redis.from_url(self._url)
        # The reader blocks in XREAD, so it needs a connection that nothing else waits on.
        self._reader = aioredis.Redis.from_url(self._url)
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._read_replies, self._reader)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._redis is not None and self._reader is not None and self._tasks is not None
        # Shielded: a client left because of a cancellation must still cancel its requests and close sockets.
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await self._close_inflight()
        self._tasks.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the task group, so it leaves `async with` as itself
            # rather than wrapped in an ExceptionGroup; the reader only ever ends by this cancellation.
            await self._tasks.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.aclose()
                await self._redis.aclose()

    async def submit(
        self,
        *,
        messages: Iterable[MessageLike] | None = None,
        prompt: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> RequestHandle:
        """Send a chat (messages) or completion (prompt) request and return its handle."""
        commands = self._commands()
        if self._failure is not None:
            raise RequestFailed(ErrorCode.INTERNAL, self._failure)
        request = self._new_request(messages, prompt, options)
        reply_key = self.keys.reply(self.client_id, request.id)
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        inflight = _Inflight(request.id, send, receive)
        self._inflight[reply_key] = inflight
        pipe = commands.pipeline(transaction=False)
        pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
        pipe.expire(self.wake_key, WAKE_TTL_S)
        pipe.xadd(self.keys.requests, {REQUEST_FIELD: encode_request(request, self.keys)})
        try:
            await pipe.execute()
        except BaseException:
            del self._inflight[reply_key]
            inflight.close()
            # Cut short mid-flight, the request may have been queued anyway: make sure no worker spends on it.
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True), suppress(RedisError):
                await self.cancel(request.id)
            raise
        deadline_s = options.get("deadline_s")
        give_up_at = None if deadline_s is None else anyio.current_time() + deadline_s + self._deadline_grace_s
        return RequestHandle(self, inflight, give_up_at)

    async def stream_chat(
        self, messages: Iterable[MessageLike], **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[TokenEvent | DoneEvent, None]:
        """Yield a chat's token events, then its DoneEvent; raise RequestFailed on an error event."""
        async with await self.submit(messages=messages, **options) as handle:
            async for event in handle:
                yield _succeeded(event, handle.id)

    async def stream_completion(
        self, prompt: str, **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[TokenEvent | DoneEvent, None]:
        """Yield a raw prompt's token events, then its DoneEvent; raise RequestFailed on an error event."""
        async with await self.submit(prompt=prompt, **options) as handle:
            async for event in handle:
                yield _succeeded(event, handle.id)

    async def chat(self, messages: Iterable[MessageLike], **options: Unpack[RequestOptions]) -> Completion:
        """Run a chat request to the end and return the whole answer."""
        async with await self.submit(messages=messages, **options) as handle:
            return await handle.result()

    async def completion(self, prompt: str, **options: Unpack[RequestOptions]) -> Completion:
        """Run a raw-prompt request to the end and return the whole answer."""
        async with await self.submit(prompt=prompt, **options) as handle:
            return await handle.result()

    async def cancel(self, request_id: str) -> None:
        """Ask the worker to stop one of this client's requests; its final event still arrives."""
        await self._commands().set(self.keys.cancel(self.client_id, request_id), 1, ex=CANCEL_TTL_S)

    def _new_request(
        self, messages: Iterable[MessageLike] | None, prompt: str | None, options: Mapping[str, Any]
    ) -> Request:
        if (messages is None) == (prompt is None):
            raise TypeError("pass exactly one of messages (chat) or prompt (completion)")
        params, deadline_s = sampling_params(options)
        now = time.time()
        return Request(
            id=secrets.token_hex(16),
            client_id=self.client_id,
            kind=RequestKind.CHAT if messages is not None else RequestKind.COMPLETION,
            messages=tuple(_chat_message(m) for m in messages or ()),
            prompt=prompt or "",
            params=params,
            deadline=None if deadline_s is None else now + deadline_s,
            created=now,
        )

    def _commands(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("use the client inside `async with`")
        return self._redis

    async def _abandon(self, inflight: _Inflight) -> None:
        """Stop delivering a request's events to its consumer and ask the worker to stop it."""
        # Kept in the XREAD set until its final event arrives, so the reply stream is still deleted.
        inflight.abandoned_at = anyio.current_time()
        with suppress(RedisError):
            await self.cancel(inflight.request_id)

    async def _close_inflight(self) -> None:
        """Cancel every request whose consumer never finished and end their event streams."""
        pipe = self._commands().pipeline(transaction=False)
        for inflight in self._inflight.values():
            # Abandoned ones too: their own cancel may have been cut short by a native asyncio cancellation.
            pipe.set(self.keys.cancel(self.client_id, inflight.request_id), 1, ex=CANCEL_TTL_S)
            inflight.close()
        pipe.delete(self.wake_key)
        self._inflight.clear()
        with suppress(RedisError):
            await pipe.execute()

    async def _read_replies(self, reader: aioredis.Redis) -> None:
        """The one reader: XREAD all reply streams plus the wake stream, dispatch, delete finished streams."""
        wake_id: bytes | str = b"0-0"
        retries = 0
        try:
            while True:
                streams = self._streams_to_read(wake_id)
                try:
                    response = await reader.xread(streams, block=self._block_ms)  # type: ignore[arg-type]
                except (RedisConnectionError, RedisTimeoutError):
                    # The streams keep every event, so reading again from the last ids loses nothing.
                    retries += 1
                    await anyio.sleep(min(0.05 * 2**retries, 1.0))
                    continue
                retries = 0
                finished = []
                for key, entries in _stream_entries(response):
                    if key == self.wake_key:
                        wake_id = entries[-1][0]
                    elif self._dispatch(key, entries):
                        finished.append(key)
                await self._forget(finished)
        except Exception as exc:  # noqa: BLE001 - any reader death must fail the waiting requests, not hang them
            self._failure = f"reply reader failed: {type(exc).__name__}: {exc}"
            for inflight in self._inflight.values():
                inflight.fail(ErrorCode.INTERNAL, self._failure)
            self._inflight.clear()

    def _streams_to_read(self, wake_id: bytes | str) -> dict[str, bytes | str]:
        now = anyio.current_time()
        for key, inflight in list(self._inflight.items()):
            # A worker that never answers a cancelled request must not grow the XREAD forever.
            if inflight.abandoned_at is not None and now - inflight.abandoned_at > self._drain_s:
                del self._inflight[key]
                inflight.close()
        return {self.wake_key: wake_id} | {key: inflight.last_id for key, inflight in self._inflight.items()}

    def _dispatch(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> bool:
        """Hand a reply stream's new entries to its request; True when its final event was among them."""
        inflight = self._inflight.get(key)
        if inflight is None:
            return False
        for entry_id, fields in entries:
            inflight.last_id = entry_id
            if inflight.accept(fields.get(EVENT_FIELD)):
                return True
        return False

    async def _forget(self, reply_keys: list[str]) -> None:
        """Delete finished reply streams; cancel the requests the client itself failed."""
        if not reply_keys:
            return
        pipe = self._commands().pipeline(transaction=False)
        pipe.delete(*reply_keys)
        for key in reply_keys:
            inflight = self._inflight.pop(key, None)
            if inflight is not None and inflight.failed_locally:
                pipe.set(self.keys.cancel(self.client_id, inflight.request_id), 1, ex=CANCEL_TTL_S)
        with suppress(RedisError):
            await pipe.execute()


class RequestHandle:
    """One submitted request: iterate it for its protocol events; exactly one final event ends it."""

    def __init__(
        self,
        client: Client,
        inflight: _Inflight,
        give_up_at: float | None,
    ) -> None:
        self.id = inflight.request_id
        self.final: DoneEvent | ErrorEvent | None = None
        self._client = client
        self._inflight = inflight
        self._give_up_at = give_up_at
        self._received = 0
        self._closed = False

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Event:
        if self.final is not None or self._closed:
            raise StopAsyncIteration
        event = await self._receive()
        self._received += 1
        if not isinstance(event, TokenEvent):
            self.final = event
            self._inflight.receive.close()
        return event

    async def result(self) -> Completion:
        """Read the request to its end and return the concatenated answer."""
        parts: list[str] = []
        async for event in self:
            ok = _succeeded(event, self.id)
            if isinstance(ok, DoneEvent):
                return Completion("".join(parts), ok.finish_reason, ok.usage, ok.timings, self.id)
            parts.append(ok.text)
        raise RequestFailed(ErrorCode.INTERNAL, "the request ended without a final event", self.id)

    async def cancel(self) -> None:
        """Ask the worker to stop; keep iterating to get the final `cancelled` event."""
        await self._client.cancel(self.id)

    async def aclose(self) -> None:
        """Stop reading; if the final event has not arrived, cancel the request."""
        if self._closed:
            return
        self._closed = True
        self._inflight.receive.close()
        if self.final is None:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await self._client._abandon(self._inflight)

    async def __aenter__(self) -> RequestHandle:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _receive(self) -> Event:
        delay = None if self._give_up_at is None else max(0.0, self._give_up_at - anyio.current_time())
        with anyio.move_on_after(delay):
            try:
                return await self._inflight.receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return ErrorEvent(self._received, ErrorCode.CANCELLED, "the client closed before the request ended")
        await self._client._abandon(self._inflight)
        return ErrorEvent(self._received, ErrorCode.DEADLINE_EXCEEDED, "no final event by the deadline")


@dataclass(eq=False)
class _Inflight:
    """The reader's view of one request: where it has read to and which event comes next."""

    request_id: str
    send: MemoryObjectSendStream[Event]
    receive: MemoryObjectReceiveStream[Event]
    last_id: bytes | str = b"0-0"
    next_n: int = 0
    abandoned_at: float | None = None
    failed_locally: bool = False

    def accept(self, data: bytes | None) -> bool:
        """Pass one reply entry on in order; True once the request's final event has been handled."""
        event = self._check(data)
        if event is None:
            return False
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.send.send_nowait(event)
        if isinstance(event, TokenEvent):
            return False
        self.send.close()
        return True

    def close(self) -> None:
        """Close both ends: a consumer still waiting sees the end of the stream."""
        self.send.close()
        self.receive.close()

    def fail(self, code: ErrorCode, message: str) -> None:
        """End the request with an error made on the client side."""
        self.failed_locally = True
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.send.send_nowait(ErrorEvent(self.next_n, code, message))
        self.send.close()

    def _check(self, data: bytes | None) -> Event | None:
        if data is None:
            self.failed_locally = True
            return ErrorEvent(self.next_n, ErrorCode.INTERNAL, "reply entry without an event field")
        try:
            event = decode_event(data)
        except ProtocolError as exc:
            self.failed_locally = True
            return ErrorEvent(self.next_n, exc.code, exc.message)
        if event.n < self.next_n:
            return None  # a worker that retries a write after a lost reply may repeat an event
        if event.n > self.next_n:
            self.failed_locally = True
            return ErrorEvent(self.next_n, ErrorCode.INTERNAL, f"event {self.next_n} missing; got {event.n}")
        self.next_n += 1
        return event


def _succeeded(event: Event, request_id: str) -> TokenEvent | DoneEvent:
    """The event itself, unless it is an error event: then raise it as RequestFailed."""
    if isinstance(event, ErrorEvent):
        raise RequestFailed(event.code, event.message, request_id)
    return event


def resolve_url(url: str | None) -> str:
    """The given Redis URL, else $REDIS_URL; raise ValueError when there is neither."""
    resolved = url or os.environ.get("REDIS_URL")
    if not resolved:
        raise ValueError("no Redis URL: pass one or set REDIS_URL")
    return resolved


def sampling_params(options: Mapping[str, Any]) -> tuple[SamplingParams, float | None]:
    """Split keyword options into SamplingParams and deadline_s; TypeError on an unknown name."""
    values = dict(options)
    deadline_s = values.pop("deadline_s", None)
    stop = values.pop("stop", None)
    if stop is not None:
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(**values), deadline_s


def _chat_message(message: MessageLike) -> ChatMessage:
    """A ChatMessage from itself or from a {"role", "content"} mapping."""
    if isinstance(message, ChatMessage):
        return message
    try:
        return ChatMessage(role=message["role"], content=message["content"])
    except KeyError as exc:
        raise TypeError(f"a chat message needs role and content, got {sorted(message)}") from exc


def _stream_entries(response: Any) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """XREAD's reply as (key, entries) pairs, whichever RESP version redis-py spoke."""
    pairs = response.items() if isinstance(response, dict) else (response or [])
    result = []
    for key, entries in pairs:
        # RESP3 wraps each stream's entry list in one more list.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        name = key.decode() if isinstance(key, bytes) else key
        result.append((name, [(i, f) for i, f in entries if i is not None and f is not None]))
    return result
