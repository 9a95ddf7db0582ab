"""Events to Redis: one pipelined round trip per engine step, acks after final events, cancel checks.

A Redis error fails only the request whose command it answered. Pipelines run with raise_on_error=False and
every command's reply is looked at: an error of the server's state (out of memory, read-only replica, failed
snapshot) is retried with backoff, the commands that succeeded not sent again; any other error (WRONGTYPE on a
reply key the client replaced) ends that request alone, with an `internal` error event where its reply stream
still takes one, else dropped and counted. Acks go in a second round trip, only for final events Redis took, so
an entry is never acked before its answer is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llamaq.protocol import (
    EVENT_FIELD,
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
from .in_flight import InFlight, Ticket
from .lease import Lease
from .metrics import DROPPED_LEASE_LOST, DROPPED_REDIS_ERROR, WorkerMetrics
from .redis_errors import Backoff, error_code, is_transient

log = logging.getLogger("llamaq.publisher")

# A reply stream of a request still running must not expire under a slow generation.
_RUNNING_TTL_S = 3600


@dataclass
class _Batch:
    outgoing: list[Outgoing] = field(default_factory=list)
    last: bool = False


@dataclass
class _Write:
    """Commands of one round trip that belong to one request (`owner`: its key, or an entry id); an event's
    XADD is a write of its own, since it is the one command that must not be sent twice."""

    owner: str
    add: Callable[[Pipeline], object]
    n: int | None = None
    """The number of the event this write carries, if it carries one."""
    final: bool = False
    """The event is the request's last."""
    entry: tuple[str, bytes] | None = None
    """The request entry (stream, id) the write answers for: fenced by the lease."""


@dataclass
class _Outcome:
    """What Redis did with a round trip's writes."""

    replies: dict[int, object] = field(default_factory=dict)
    """Each successful write's last reply, by its index."""
    refused: dict[str, BaseException] = field(default_factory=dict)
    """The first lasting error of each owner whose writes failed."""
    written: set[int] = field(default_factory=set)
    """Indexes of the writes Redis took."""
    fenced: set[str] = field(default_factory=set)
    """Owners whose entries another worker took over while this worker's lease had lapsed: not written."""


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
        self, entry_id: bytes, reply_key: str | None, error: ProtocolError, stream: str | None = None
    ) -> None:
        """Answer an entry that never reached the engine with an error event, and ack it."""
        event = ErrorEvent(n=0, code=error.code, message=error.message)
        if await self.answer(entry_id, reply_key, event, stream) and self.metrics is not None:
            self.metrics.count_rejected(error.code.value)

    async def ack(self, entry_id: bytes, stream: str | None = None) -> None:
        """Ack (and delete) an entry that needs no event: it was answered before, or handed to another worker."""
        await self._ack_entries([(entry_id, stream)])

    async def answer(
        self, entry_id: bytes, reply_key: str | None, event: FinalEvent, stream: str | None = None
    ) -> bool:
        """Write the only event of an entry that never reached the engine, and ack it; False when its reply
        stream refused the event (the entry is acked all the same, and counted as dropped)."""
        written = True
        held = (stream or self._keys.requests, entry_id)
        if reply_key is not None:
            owner = entry_id.decode(errors="replace")
            outcome = await self._execute(self._final_writes(owner, reply_key, event, held))
            written = 0 in outcome.written
            if owner in outcome.fenced:
                return False
            if not written:
                self._count_dropped(owner, outcome.refused.get(owner))
        await self._ack_entries([(entry_id, stream)])
        return written

    async def _publish(self, outgoing: list[Outgoing]) -> None:
        addressed = self._address(outgoing)
        writes = self._event_writes(addressed)
        finishing = {t.request_key for t, item in addressed if item.final}
        watched = [t for t in self._in_flight if t.request_key not in finishing and not t.cancel_sent]
        # Cancel checks ride on the step's round trip, so a cancel takes effect within one step.
        checks = len(writes)
        writes += [_Write(t.request_key, partial(_exists, t.cancel_key), entry=self._held(t)) for t in watched]
        outcome = await self._execute(writes)
        answered: list[Ticket] = []
        for index, write in enumerate(writes[:checks]):
            ticket = self._in_flight.get(write.owner)
            if ticket is None or index not in outcome.written or write.n is None:
                continue
            ticket.next_event = max(ticket.next_event, write.n + 1)
            if write.final:
                answered.append(ticket)
        for owner, error in outcome.refused.items():
            ticket = self._in_flight.get(owner)
            if ticket is not None and ticket not in answered:
                answered.append(await self._fail(ticket, error))
        for ticket in answered:
            await self._ack_entries([(ticket.entry_id, ticket.stream or None)])
        for ticket in answered:
            self._in_flight.remove(ticket.request_key)
        for index, ticket in enumerate(watched, start=checks):
            if outcome.replies.get(index) and self.engine_loop is not None and ticket.request_key in self._in_flight:
                ticket.cancel_sent = True
                self.engine_loop.cancel(ticket.request_key)

    def _event_writes(self, addressed: list[tuple[Ticket, Outgoing]]) -> list[_Write]:
        """Each event's XADD (a finished turn's history first), then one EXPIRE per reply stream touched."""
        writes: list[_Write] = []
        ttls: dict[str, tuple[Ticket, int]] = {}
        for ticket, item in addressed:
            owner = ticket.request_key
            if item.history is not None:
                # Before the final event: a client that starts the next turn on seeing it finds the history.
                writes.append(_Write(owner, partial(self._save_history, *item.history), entry=self._held(ticket)))
            writes.append(
                _Write(
                    owner,
                    partial(_xadd, ticket.reply_key, encode_event(item.event)),
                    item.event.n,
                    item.final,
                    self._held(ticket),
                )
            )
            ttls[ticket.reply_key] = (ticket, self._reply_ttl_s if item.final else _RUNNING_TTL_S)
        for key, (ticket, ttl) in ttls.items():
            writes.append(_Write(ticket.request_key, partial(_expire, key, ttl), entry=self._held(ticket)))
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
            self._final_writes(ticket.request_key, ticket.reply_key, event, self._held(ticket))
        )
        if 0 in outcome.written:
            if self.metrics is not None:
                self.metrics.count_rejected(ErrorCode.INTERNAL.value)
        elif ticket.request_key not in outcome.fenced:  # a fenced one was counted as lost to another worker
            self._count_dropped(ticket.request_key, error)
        return ticket

    def _final_writes(self, owner: str, reply_key: str, event: FinalEvent, held: tuple[str, bytes]) -> list[_Write]:
        """The XADD of a request's final event (write 0) and its reply stream's TTL."""
        return [
            _Write(owner, partial(_xadd, reply_key, encode_event(event)), event.n, final=True, entry=held),
            _Write(owner, partial(_expire, reply_key, self._reply_ttl_s), entry=held),
        ]

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

    async def _ack_entries(self, entries: list[tuple[bytes, str | None]]) -> None:
        # One consumer group reads this stream, so an acked entry is garbage: deleting it keeps the stream
        # short without trimming, and trimming by length could drop entries still pending.
        writes = []
        for entry_id, stream in entries:
            name, owner = stream or self._keys.requests, entry_id.decode(errors="replace")
            # XACK acks for the whole group: an entry another worker took over must not be acked from here.
            held = (name, entry_id)
            writes.append(_Write(owner, partial(_xack, name, self._keys.group, entry_id), entry=held))
            writes.append(_Write(owner, partial(_xdel, name, entry_id), entry=held))
        if writes:
            outcome = await self._execute(writes)
            for owner, error in outcome.refused.items():
                log.error("could not ack entry %s (%s)", owner, error_code(error))

    async def _execute(self, writes: list[_Write]) -> _Outcome:
        """Send the writes in one pipeline, again (with backoff) those that met an error the server recovers
        from, until each is taken or refused for good."""
        outcome = _Outcome()
        to_send = list(range(len(writes)))
        backoff = Backoff()
        while to_send:
            if self.lease is not None and (self.lease.lapsed() or self.lease.regains != self._regains_seen):
                await self._regain()
                fenced = [index for index in to_send if not self._still_held(writes[index])]
                outcome.fenced.update(writes[index].owner for index in fenced)
                to_send = [index for index in to_send if index not in fenced]
                if not to_send:
                    break
            pipe = self._redis.pipeline(transaction=False)
            spans = []
            for index in to_send:
                start = len(pipe)
                writes[index].add(pipe)
                spans.append((index, start, len(pipe)))
            try:
                replies: list[object] = await pipe.execute(raise_on_error=False)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # Replaying the pipeline may write an event twice; clients drop duplicates by event number.
                self._retrying(exc, backoff)
                await backoff.wait()
                continue
            retry: list[int] = []
            for index, start, end in spans:
                owner = writes[index].owner
                errors = [r for r in replies[start:end] if isinstance(r, BaseException)]
                if not errors:
                    outcome.written.add(index)
                    outcome.replies[index] = replies[end - 1] if end > start else None
                elif all(is_transient(e) for e in errors):
                    retry.append(index)
                else:
                    outcome.refused.setdefault(owner, next(e for e in errors if not is_transient(e)))
            to_send = [index for index in retry if writes[index].owner not in outcome.refused]
            if to_send:
                first = next(r for r in replies if isinstance(r, BaseException))
                self._retrying(first, backoff)
                await backoff.wait()
        return outcome

    def _held(self, ticket: Ticket) -> tuple[str, bytes]:
        return (ticket.stream or self._keys.requests, ticket.entry_id)

    def _still_held(self, write: _Write) -> bool:
        return write.entry is None or self.lease is None or self.lease.still_holds(*write.entry)

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


# The commands of a write, bound to their keys by functools.partial and added to a pipeline when it is built.


def _xadd(key: str, data: bytes, pipe: Pipeline) -> object:
    return pipe.xadd(key, {EVENT_FIELD: data})


def _expire(key: str, ttl_s: int, pipe: Pipeline) -> object:
    return pipe.expire(key, ttl_s)


def _exists(key: str, pipe: Pipeline) -> object:
    return pipe.exists(key)


def _xack(stream: str, group: str, entry_id: bytes, pipe: Pipeline) -> object:
    return pipe.xack(stream, group, entry_id)


def _xdel(stream: str, entry_id: bytes, pipe: Pipeline) -> object:
    return pipe.xdel(stream, entry_id)
