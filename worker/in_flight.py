"""Requests this worker has taken from the stream and not yet answered with a final event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TenantSlot:
    """A request's place in its tenant's counts of requests in flight and waiting (protocol/admission.py), given
    back with its final event."""

    owner: str
    """Request.owner."""
    request_key: str
    """Request.key, the member of the owner's sets."""


@dataclass
class Ticket:
    """Where a request came from and where its events go."""

    request_key: str
    """Request.key: client and request id."""
    entry_id: bytes
    """Id of the request's entry in the request stream, acked after the final event is written."""
    reply_key: str
    cancel_key: str
    stream: str = ""
    """The stream the entry came from (the queue's, or a worker's inbox); acked there."""
    cancel_sent: bool = False
    next_event: int = 0
    """The number of the next event to write (after those a dead worker published, for a resumed request)."""
    slot: TenantSlot | None = None
    """Given back when the request is acked."""
    ttl_set_at: float | None = None
    """When (monotonic) the running TTL was last set on the reply stream; None: not yet."""


class InFlight:
    """Tickets by Request.key; the intake adds them, the publisher removes them after the final event."""

    def __init__(self) -> None:
        self._tickets: dict[str, Ticket] = {}
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tickets)

    def __contains__(self, request_key: str) -> bool:
        return request_key in self._tickets

    def __iter__(self) -> Iterator[Ticket]:
        return iter(list(self._tickets.values()))

    def get(self, request_key: str) -> Ticket | None:
        """The ticket of a request in flight."""
        return self._tickets.get(request_key)

    def add(self, ticket: Ticket) -> None:
        """Track a request taken from the stream."""
        self._tickets[ticket.request_key] = ticket

    def remove(self, request_key: str) -> None:
        """Forget a request whose final event is written and acked."""
        if self._tickets.pop(request_key, None) is not None:
            self._changed.set()

    async def wait_below(self, limit: int) -> None:
        """Wait until fewer than `limit` requests are in flight."""
        while len(self._tickets) >= limit:
            self._changed.clear()
            await self._changed.wait()
