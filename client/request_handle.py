"""What a caller holds after submitting: iterate a request's events, wait for its whole answer, or cancel it."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from redis.exceptions import RedisError

from llamaq.protocol import (
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinalEvent,
    FinishReason,
    ResultEvent,
    Timings,
    TokenEvent,
    Usage,
)

from .errors import RequestFailed, succeeded
from .in_flight import CLEANUP_TIMEOUT_S, Inflight

if TYPE_CHECKING:
    from .client import Client


@dataclass(frozen=True)
class Completion:
    """The whole answer to one request."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    request_id: str


class RequestHandle:
    """One submitted request: iterate it for its protocol events; exactly one final event ends it."""

    def __init__(
        self,
        client: Client,
        inflight: Inflight,
        give_up_at: float | None,
    ) -> None:
        self.id = inflight.request_id
        self.final: FinalEvent | None = None
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
            ok = succeeded(event, self.id)
            if isinstance(ok, DoneEvent):
                return Completion("".join(parts), ok.finish_reason, ok.usage, ok.timings, self.id)
            parts.append(ok.text)
        raise RequestFailed(ErrorCode.INTERNAL, "the request ended without a final event", self.id)

    async def outcome(self) -> dict[str, Any]:
        """Read an `op` request to its end and return what its result event carries."""
        async for event in self:
            if isinstance(event, ResultEvent):
                return event.data
            if isinstance(event, ErrorEvent):
                raise RequestFailed(event.code, event.message, self.id)
        raise RequestFailed(ErrorCode.INTERNAL, "the request ended without a result event", self.id)

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
                await self._abandon()

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
        await self._abandon()
        return ErrorEvent(self._received, ErrorCode.DEADLINE_EXCEEDED, "no final event by the deadline")

    async def _abandon(self) -> None:
        """Stop delivering the request's events to its consumer and ask the worker to stop it."""
        # Kept in the XREAD set until its final event arrives, so the reply stream is still deleted.
        self._inflight.abandoned_at = anyio.current_time()
        with suppress(RedisError):
            await self._client.cancel(self.id)
