"""One submitted request between the reader and its consumer: events passed on in order, exactly one final event."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from llamaq.protocol import ErrorCode, ErrorEvent, Event, ProtocolError, TokenEvent, decode_event

CANCEL_TTL_S = 3600
# Best-effort Redis calls made while unwinding (auto-cancel, close) must not hang a cancelled task.
CLEANUP_TIMEOUT_S = 2.0


@dataclass(eq=False)
class Inflight:
    """The reader's view of one request: where it has read to and which event comes next."""

    request_id: str
    send: MemoryObjectSendStream[Event]
    receive: MemoryObjectReceiveStream[Event]
    last_id: bytes | str = b"0-0"
    entry_id: bytes | str | None = None
    """The request's entry in the request stream, once queued."""
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
