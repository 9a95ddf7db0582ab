"""Events to Redis: one pipelined round trip per engine step, acks after final events, cancel checks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llamaq.protocol import EVENT_FIELD, ErrorEvent, FinalEvent, Keys, ProtocolError, encode_event

from .conversations import ConversationStore
from .engine_loop import EngineLoop, Outgoing, StepStats
from .in_flight import InFlight, TenantSlot, Ticket
from .metrics import WorkerMetrics

log = logging.getLogger("llamaq.publisher")

# A reply stream of a request still running must not expire under a slow generation.
_RUNNING_TTL_S = 3600


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
        self.engine_loop: EngineLoop | None = None
        self.metrics: WorkerMetrics | None = None

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
        if self.metrics is not None:
            self.metrics.count_rejected(error.code.value)
        event = ErrorEvent(n=0, code=error.code, message=error.message)
        await self.answer(entry_id, reply_key, event, stream, slot)

    async def ack(self, entry_id: bytes, stream: str | None = None, slot: TenantSlot | None = None) -> None:
        """Ack (and delete) an entry that needs no event: it was answered before, or handed to another worker."""
        await self._execute(lambda pipe: self._ack(pipe, entry_id, stream, slot))

    async def answer(
        self,
        entry_id: bytes,
        reply_key: str | None,
        event: FinalEvent,
        stream: str | None = None,
        slot: TenantSlot | None = None,
    ) -> None:
        """Write the only event of an entry that never reached the engine, and ack it."""

        def build(pipe: Pipeline) -> None:
            if reply_key is not None:
                pipe.xadd(reply_key, {EVENT_FIELD: encode_event(event)})
                pipe.expire(reply_key, self._reply_ttl_s)
            self._ack(pipe, entry_id, stream, slot)

        await self._execute(build)

    async def _publish(self, outgoing: list[Outgoing]) -> None:
        addressed = self._address(outgoing)
        finished = [ticket for ticket, item in addressed if item.final]
        finished_ids = {t.request_key for t in finished}
        watched = [t for t in self._in_flight if t.request_key not in finished_ids and not t.cancel_sent]
        touched = {t.reply_key: self._reply_ttl_s if i.final else _RUNNING_TTL_S for t, i in addressed}

        def build(pipe: Pipeline) -> None:
            for ticket, item in addressed:
                if item.history is not None:
                    # Before the final event: a client that starts the next turn on seeing it finds the history.
                    self._conversations.save(pipe, *item.history, served_here=True)
                pipe.xadd(ticket.reply_key, {EVENT_FIELD: encode_event(item.event)})
            for key, ttl in touched.items():
                pipe.expire(key, ttl)
            for ticket in finished:
                self._ack(pipe, ticket.entry_id, ticket.stream or None, ticket.slot)
            # Cancel checks ride on the step's round trip, so a cancel takes effect within one step.
            for ticket in watched:
                pipe.exists(ticket.cancel_key)

        results = await self._execute(build)
        for ticket in finished:
            self._in_flight.remove(ticket.request_key)
        for ticket, found in zip(watched, results[len(results) - len(watched) :], strict=True):
            if found and self.engine_loop is not None:
                ticket.cancel_sent = True
                self.engine_loop.cancel(ticket.request_key)

    def _address(self, outgoing: list[Outgoing]) -> list[tuple[Ticket, Outgoing]]:
        """Each event with the ticket of its request, in order."""
        addressed = []
        for item in outgoing:
            ticket = self._in_flight.get(item.request_key)
            if ticket is None:
                log.warning("event for unknown request %s dropped", item.request_key)
            else:
                addressed.append((ticket, item))
        return addressed

    def _ack(self, pipe: Pipeline, entry_id: bytes, stream: str | None = None, slot: TenantSlot | None = None) -> None:
        # One consumer group reads this stream, so an acked entry is garbage: deleting it keeps the stream
        # short without trimming, and trimming by length could drop entries still pending.
        stream = stream or self._keys.requests
        pipe.xack(stream, self._keys.group, entry_id)
        pipe.xdel(stream, entry_id)
        if slot is not None:
            # Answered: the request no longer counts against its tenant (both sets: it may never have been read).
            pipe.zrem(self._keys.tenant_in_flight(slot.owner), slot.request_key)
            pipe.zrem(self._keys.tenant_backlog(slot.owner), slot.request_key)

    async def _execute(self, build: Callable[[Pipeline], None]) -> list[object]:
        delay = 0.05
        while True:
            pipe = self._redis.pipeline(transaction=False)
            build(pipe)
            try:
                results: list[object] = await pipe.execute()
                return results
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # Replaying the pipeline may write an event twice; clients drop duplicates by event number.
                log.warning("publishing failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
