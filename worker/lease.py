"""This worker's heartbeat as a lease on the requests it holds: fencing after a pause or a partition.

Other workers take over this one's pending entries once its heartbeat has been missing for a TTL (reclaimer.py).
So a worker that could not renew its heartbeat for that long (stopped by SIGSTOP, starved of CPU, cut off from
Redis) may have lost any of its requests, and must not write another event or ack for them: the worker that
claimed one answers it. From its own monotonic clock the worker knows a lower bound of its heartbeat's expiry, a
TTL after it *sent* the last beat Redis took. From that moment, less a margin for writes in transit, its publisher
writes nothing (it is fenced) until the monitor has beaten again and read which of its entries were taken.
A claim runs in a transaction that watches the heartbeat and records the entries it takes in the worker's
`taken` set (Keys.taken), so once the new beat is in, nobody takes another, and the set is complete: those
requests are dropped without a word (counted in llamaq_requests_dropped_total{reason="lease_lost"}), the
others are served on. A Redis that lost its data (a restart without persistence) took nothing from anyone,
so a worker whose lease lapsed through it goes on serving what it holds.

A write still travelling when the lease ends is not fenced: one the network delays for longer than the margin
plus a TTL (the reclaimer waits a TTL after the expiry) could land after another worker's.
"""

from __future__ import annotations

import asyncio
import time

TAKEN_TTL_S = 24 * 3600
"""How long the record of entries taken from a worker is kept for it to come back and read."""


class Lease:
    """When this worker may publish, as its monitor renews the heartbeat; one per worker, on its event loop."""

    def __init__(self, ttl_s: float, margin_s: float) -> None:
        self._ttl_s = ttl_s
        self._margin_s = margin_s
        # Nothing is held before the first beat, so the first lease runs from the start.
        self._expires_at = time.monotonic() + ttl_s - margin_s
        self._renewed = asyncio.Event()
        self.taken: frozenset[tuple[str, bytes]] = frozenset()
        """(stream, entry id) of the entries other workers took, as read at the last regain."""
        self.regains = 0
        """How many times a lapsed lease was taken up again (the publisher compares it with what it has seen)."""

    def lapsed(self, now: float | None = None) -> bool:
        """True once the heartbeat may have expired in Redis (less the margin) without a renewal."""
        return (time.monotonic() if now is None else now) >= self._expires_at

    def renewed(self, sent_at: float) -> None:
        """A beat sent at `sent_at` (monotonic) was taken while the lease still ran."""
        self._expires_at = max(self._expires_at, sent_at + self._ttl_s - self._margin_s)
        self._renewed.set()

    def regained(self, sent_at: float, taken: frozenset[tuple[str, bytes]]) -> None:
        """A beat sent at `sent_at` took a lapsed lease up again; other workers had taken these entries."""
        self.taken = self.taken | taken
        self.regains += 1
        self.renewed(sent_at)

    async def held(self) -> None:
        """Return at once while the lease runs, else once it is renewed or regained."""
        while self.lapsed():
            self._renewed.clear()
            # The clock, not an event, ends a lease: look again now and then even if no beat comes.
            try:
                await asyncio.wait_for(self._renewed.wait(), timeout=self._margin_s)
            except TimeoutError:
                continue

    def still_holds(self, stream: str, entry_id: bytes) -> bool:
        """False for an entry another worker took while the lease had lapsed."""
        return (stream, entry_id) not in self.taken


def taken_member(stream: str, entry_id: bytes) -> bytes:
    """How an entry is named in a `taken` set: stream names hold no space."""
    return stream.encode() + b" " + entry_id


def parse_taken_member(member: bytes) -> tuple[str, bytes]:
    """The (stream, entry id) a `taken` set member names."""
    stream, _, entry_id = member.partition(b" ")
    return stream.decode(), entry_id
