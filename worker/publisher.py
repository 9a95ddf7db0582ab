"""Events to Redis: one pipelined round trip per engine step, acks after final events, cancel checks.

A Redis error fails only the request whose command it answered (pipelined_writes.py looks at every reply): an
error of the server's state (out of memory, read-only replica, failed snapshot) is retried with backoff, the
commands that succeeded not sent again; any other error (WRONGTYPE on a reply key the client replaced) ends that
request alone, with an `internal` error event where its reply stream still takes one, else dropped and counted.
Acks go in a second round trip, only for final events Redis took, so an entry is never acked before its answer
is written. While this worker's heartbeat lease has lapsed nothing is written at all (lease.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from llamaq.protocol import (
    ErrorCode,
    ErrorEvent,
    FinalEvent,
    History,
    Keys,
    ProtocolError,
    encode_event,
)

from .conversations import ConversationStore
from .engine_loop import EngineLoop, Outgoing, StepStats
from .in_flight import InFlight, TenantSlot, Ticket
from .lease import Lease
from .metrics import DROPPED_LEASE_LOST, DROPPED_REDIS_ERROR, WorkerMetrics
from .pipelined_writes import Outcome, Write, exists, exists_any, expire, write_all, xack, xadd, xdel, zrem
from .redis_errors import Backoff, error_code

log = logging.getLogger("llamaq.publisher")

# A reply stream of a request still running must not expire under a slow generation. Its TTL is set with the
# first event and refreshed once a quarter of it has passed, not with every event: an EXPIRE per stream per step
# was more than half of the publisher's CPU at 16 streams.
_RUNNING_TTL_S = 3600
_TTL_REFRESH_S = _RUNNING_TTL_S / 4


@dataclass
class _Batch:
    outgoing: list[Outgoing] = field(default_factory=list)
    last: bool = False


class Publisher:
    """Writes what the engine loop emits, in order, and feeds cancels found in Redis back to it."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, in_flight: InFlight, reply_ttl_s: int, conversations: ConversationStore
    ) -> None:
        self._redis = redis
        self._conversations = conversations
        self._keys = keys
        self._in_flight = in_flight
        self._reply_ttl_s = reply_ttl_s
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._given_up: set[str] = set()
        """Requests (by key) this publisher stopped writing for; their further events are dropped quietly."""
        self.engine_loop: EngineLoop | None = None
        self.metrics: WorkerMetrics | None = None
        self.lease: Lease | None = None
        """This worker's heartbeat lease; while it has lapsed nothing is written."""
        self._regains_seen = 0

    def emit_threadsafe(self, outgoing: list[Outgoing], stats: StepStats | None) -> None:
        """Hand a step's events over from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _Batch(outgoing))

    def close_threadsafe(self) -> None:
        """Tell run() that nothing more will be emitted; it returns once all before is written."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _Batch(last=True))

    async def run(self) -> None:
        """Publish batches until close; steps that queued up meanwhile go out in one round trip."""
        while True:
            batch = await self._queue.get()
            while not batch.last and not self._queue.empty():
                more = self._queue.get_nowait()
                batch.outgoing.extend(more.outgoing)
                batch.last = more.last
            if batch.outgoing or self._in_flight:
                await self._publish(batch.outgoing)
            if batch.last:
                return

    async def reject(
        self,
        entry_id: bytes,
        reply_key: str | None,
        error: ProtocolError,
        stream: str | None = None,
        slot: TenantSlot | None = None,
    ) -> None:
        """Answer an entry that never reached the engine with an error event, and ack it."""
        event = ErrorEvent(n=0, code=error.code, message=error.message)
        if await self.answer(entry_id, reply_key, event, stream, slot) and self.metrics is not None:
            self.metrics.count_rejected(error.code.value)

    async def ack(self, entry_id: bytes, stream: str | None = None, slot: TenantSlot | None = None) -> None:
        """Ack (and delete) an entry that needs no event: it was answered before, or handed to another worker."""
        await self._ack_entries([(entry_id, stream, slot)])

    async def answer(
        self,
        entry_id: bytes,
        reply_key: str | None,
        event: FinalEvent,
        stream: str | None = None,
        slot: TenantSlot | None = None,
    ) -> bool:
        """Write the only event of an entry that never reached the engine, and ack it; False when its reply
        stream refused the event (the entry is acked all the same, and counted as dropped)."""
        written = True
        held = (stream or self._keys.requests, entry_id)
        if reply_key is not None:
            owner = entry_id.decode(errors="replace")
            outcome = await self._execute(self._final_writes(owner, reply_key, event, held, slot))
            written = 0 in outcome.written
            if owner in outcome.fenced:
                return False
            if not written:
                self._count_dropped(owner, outcome.refused.get(owner))
        await self._ack_entries([(entry_id, stream, slot)])
        return written

    async def _publish(self, outgoing: list[Outgoing]) -> None:
        addressed = self._address(outgoing)
        writes = self._event_writes(addressed)
        finishing = {t.request_key for t, item in addressed if item.final}
        watched = [t for t in self._in_flight if t.request_key not in finishing and not t.cancel_sent]
        # Cancel checks ride on the step's round trip, so a cancel takes effect within one step.
        checks = len(writes)
        groups = _cancel_groups(watched)
        writes += [Write(_CHECK_OWNER, partial(exists_any, [t.cancel_key for t in group])) for group in groups]
        outcome = await self._execute(writes)
        answered: list[Ticket] = []
        for index, write in enumerate(writes[:checks]):
            ticket = self._in_flight.get(write.owner)
            if ticket is None or index not in outcome.written:
                continue
            if write.ttl_set_at is not None:
                ticket.ttl_set_at = write.ttl_set_at
            if write.n is None:
                continue
            ticket.next_event = max(ticket.next_event, write.n + 1)
            if write.final:
                answered.append(ticket)
        for owner, error in outcome.refused.items():
            ticket = self._in_flight.get(owner)
            if ticket is not None and ticket not in answered:
                answered.append(await self._fail(ticket, error))
        await self._ack_entries([(ticket.entry_id, ticket.stream or None, ticket.slot) for ticket in answered])
        for ticket in answered:
            self._in_flight.remove(ticket.request_key)
        cancelled = [group for index, group in enumerate(groups, start=checks) if outcome.replies.get(index)]
        if cancelled:
            await self._cancel_found([ticket for group in cancelled for ticket in group])

    async def _cancel_found(self, candidates: list[Ticket]) -> None:
        """A client's count of cancel keys was not zero: one EXISTS each tells which of its requests to stop."""
        checks = [Write(_CHECK_OWNER, partial(exists, ticket.cancel_key)) for ticket in candidates]
        outcome = await self._execute(checks)
        for index, ticket in enumerate(candidates):
            if outcome.replies.get(index) and self.engine_loop is not None and ticket.request_key in self._in_flight:
                ticket.cancel_sent = True
                self.engine_loop.cancel(ticket.request_key)

    def _event_writes(self, addressed: list[tuple[Ticket, Outgoing]]) -> list[Write]:
        """Each event's XADD (a finished turn's history first), then the EXPIREs due: a reply stream's running TTL
        with its first event and then every _TTL_REFRESH_S, its final TTL with its final event."""
        writes: list[Write] = []
        ttls: dict[str, tuple[Ticket, int]] = {}
        now = time.monotonic()
        for ticket, item in addressed:
            owner = ticket.request_key
            if item.history is not None:
                # Before the final event: a client that starts the next turn on seeing it finds the history.
                writes.append(Write(owner, partial(self._save_history, *item.history), entry=self._held(ticket)))
            writes.append(
                Write(
                    owner,
                    partial(xadd, ticket.reply_key, encode_event(item.event)),
                    item.event.n,
                    item.final,
                    self._held(ticket),
                )
            )
            if item.final:
                ttls[ticket.reply_key] = (ticket, self._reply_ttl_s)
                writes += self._slot_release(owner, ticket.slot, self._held(ticket))
            elif ticket.ttl_set_at is None or now - ticket.ttl_set_at >= _TTL_REFRESH_S:
                ttls.setdefault(ticket.reply_key, (ticket, _RUNNING_TTL_S))
        for key, (ticket, ttl) in ttls.items():
            write = Write(ticket.request_key, partial(expire, key, ttl), entry=self._held(ticket))
            if ttl == _RUNNING_TTL_S:
                write.ttl_set_at = now
            writes.append(write)
        return writes

    def _save_history(self, conversation: str, history: History, pipe: Pipeline) -> None:
        self._conversations.save(pipe, conversation, history, served_here=True)

    async def _fail(self, ticket: Ticket, error: BaseException) -> Ticket:
        """End a request whose commands Redis refused for good: an `internal` error event if its reply stream
        takes one, else dropped and counted. Its sequence is cancelled; what it still emits is not written."""
        code = error_code(error)
        log.warning("Redis refused a command for request %s (%s); ending it", ticket.request_key, code)
        self._given_up.add(ticket.request_key)
        if self.engine_loop is not None:
            self.engine_loop.cancel(ticket.request_key)
        # The reply names only the error code: the message and the command could echo another key's contents.
        event = ErrorEvent(n=ticket.next_event, code=ErrorCode.INTERNAL, message=f"Redis refused a write ({code})")
        outcome = await self._execute(
            self._final_writes(ticket.request_key, ticket.reply_key, event, self._held(ticket), ticket.slot)
        )
        if 0 in outcome.written:
            if self.metrics is not None:
                self.metrics.count_rejected(ErrorCode.INTERNAL.value)
        elif ticket.request_key not in outcome.fenced:  # a fenced one was counted as lost to another worker
            self._count_dropped(ticket.request_key, error)
        return ticket

    def _final_writes(
        self, owner: str, reply_key: str, event: FinalEvent, held: tuple[str, bytes], slot: TenantSlot | None = None
    ) -> list[Write]:
        """The XADD of a request's final event (write 0), its reply stream's TTL, and its tenant slot given back."""
        return [
            Write(owner, partial(xadd, reply_key, encode_event(event)), event.n, final=True, entry=held),
            Write(owner, partial(expire, reply_key, self._reply_ttl_s), entry=held),
            *self._slot_release(owner, slot, held),
        ]

    def _slot_release(self, owner: str, slot: TenantSlot | None, held: tuple[str, bytes]) -> list[Write]:
        """Take a request out of its tenant's counts (both: it may never have been read). Sent with its final
        event, not after it: a client that sends its next request on seeing the answer must find the room; the
        ack sends it again, in case the event's round trip did not take it."""
        if slot is None:
            return []
        counts = (self._keys.tenant_in_flight(slot.owner), self._keys.tenant_backlog(slot.owner))
        return [Write(owner, partial(zrem, key, slot.request_key), entry=held) for key in counts]

    def _count_dropped(self, owner: str, error: BaseException | None) -> None:
        code = "unknown" if error is None else error_code(error)
        log.warning("no event could be written for %s (%s): dropped", owner, code)
        if self.metrics is not None:
            self.metrics.count_dropped(DROPPED_REDIS_ERROR)

    def _address(self, outgoing: list[Outgoing]) -> list[tuple[Ticket, Outgoing]]:
        """Each event with the ticket of its request, in order."""
        addressed = []
        for item in outgoing:
            ticket = self._in_flight.get(item.request_key)
            if ticket is not None:
                addressed.append((ticket, item))
            elif item.request_key in self._given_up:
                if item.final:
                    self._given_up.discard(item.request_key)
            else:
                log.warning("event for unknown request %s dropped", item.request_key)
        return addressed

    async def _ack_entries(self, entries: list[tuple[bytes, str | None, TenantSlot | None]]) -> None:
        # One consumer group reads this stream, so an acked entry is garbage: deleting it keeps the stream
        # short without trimming, and trimming by length could drop entries still pending.
        writes = []
        for entry_id, stream, slot in entries:
            name, owner = stream or self._keys.requests, entry_id.decode(errors="replace")
            # XACK acks for the whole group: an entry another worker took over must not be acked from here.
            held = (name, entry_id)
            writes.append(Write(owner, partial(xack, name, self._keys.group, entry_id), entry=held))
            writes.append(Write(owner, partial(xdel, name, entry_id), entry=held))
            writes += self._slot_release(owner, slot, held)
        if writes:
            outcome = await self._execute(writes)
            for owner, error in outcome.refused.items():
                log.error("could not ack entry %s (%s)", owner, error_code(error))

    async def _execute(self, writes: list[Write]) -> Outcome:
        fence = None if self.lease is None else self
        return await write_all(self._redis, writes, fence, self._retrying)

    def fence_needed(self) -> bool:
        """Fence: the lease lapsed, or was taken up again since this publisher last looked."""
        assert self.lease is not None
        return self.lease.lapsed() or self.lease.regains != self._regains_seen

    async def settle(self) -> None:
        """Fence: wait out a lapsed lease, then drop the requests another worker took meanwhile."""
        await self._regain()

    def holds(self, entry: tuple[str, bytes]) -> bool:
        """Fence: whether this worker still holds a request entry."""
        return self.lease is None or self.lease.still_holds(*entry)

    def _held(self, ticket: Ticket) -> tuple[str, bytes]:
        return (ticket.stream or self._keys.requests, ticket.entry_id)

    async def _regain(self) -> None:
        """Wait out a lapsed lease (the monitor takes it up again), then drop the requests another worker took."""
        assert self.lease is not None
        if self.lease.lapsed():
            log.warning("this worker's heartbeat lease lapsed; publishing waits until it is renewed")
            await self.lease.held()
        if self.lease.regains == self._regains_seen:
            return
        self._regains_seen = self.lease.regains
        for ticket in self._in_flight:
            if not self.lease.still_holds(*self._held(ticket)):
                self._lose(ticket)

    def _lose(self, ticket: Ticket) -> None:
        """Forget a request another worker took over: it answers it; this one writes nothing more for it."""
        log.warning("request %s was taken over by another worker while this one's lease had lapsed", ticket.request_key)
        self._given_up.add(ticket.request_key)
        self._in_flight.remove(ticket.request_key)
        if self.engine_loop is not None:
            self.engine_loop.cancel(ticket.request_key)
        if self.metrics is not None:
            self.metrics.count_dropped(DROPPED_LEASE_LOST)

    def _retrying(self, error: BaseException, backoff: Backoff) -> None:
        code = error_code(error)
        log.warning("publishing failed (%s); retrying in %.2fs", code, backoff.delay_s)
        if self.metrics is not None:
            self.metrics.count_redis_retry(code)


# Cancel checks are reads charged to no request: one that fails (a lost connection, retried) fails nobody.
_CHECK_OWNER = "cancel-check"


def _cancel_groups(watched: list[Ticket]) -> list[list[Ticket]]:
    """The watched requests by client: a client's cancel keys share its hash slot ({c:<client>}), so one
    multi-key EXISTS counts them all (and is allowed on a cluster)."""
    groups: dict[str, list[Ticket]] = {}
    for ticket in watched:
        groups.setdefault(ticket.cancel_key.rpartition(":cancel:")[0], []).append(ticket)
    return list(groups.values())
