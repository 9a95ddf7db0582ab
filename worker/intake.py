"""Redis to engine: read requests from the consumer group, validate them, hand them to the engine loop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llamaq.protocol import (
    REQUEST_FIELD,
    STATE_OPS,
    ConversationOp,
    ErrorCode,
    Keys,
    Limits,
    ProtocolError,
    Request,
    RequestKind,
    ResultEvent,
    Sender,
    decode_request,
    identify_sender,
)

from .conversations import ConversationStore, live_owner
from .engine_loop import EngineLoop, cancelled_before_start
from .in_flight import InFlight, TenantSlot, Ticket
from .metrics import WorkerMetrics
from .publisher import Publisher
from .redis_errors import Backoff, error_code, is_transient
from .resume import published_so_far

log = logging.getLogger("llamaq.intake")

_BLOCK_MS = 1000
"""How long one XREADGROUP waits; it bounds how long a stop takes to be noticed."""


class Intake:
    """Pulls only as many requests as the worker has room for, so idle workers get the rest."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: str,
        limits: Limits,
        max_in_flight: int,
        in_flight: InFlight,
        engine_loop: EngineLoop,
        publisher: Publisher,
        conversations: ConversationStore,
    ) -> None:
        self._conversations = conversations
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._limits = limits
        self._max_in_flight = max_in_flight
        self._in_flight = in_flight
        self._engine_loop = engine_loop
        self._publisher = publisher
        self._stopping = False
        self._inbox = keys.inbox(consumer)
        self.handed_over = 0
        """Turns this worker handed to the live worker that holds their conversation's KV."""
        self.metrics: WorkerMetrics | None = None

    async def join_group(self) -> None:
        """Create the consumer groups (and streams) of the queue and of this worker's inbox unless they exist;
        from id 0 so early requests are served."""
        for stream in (self._keys.requests, self._inbox):
            try:
                await self._redis.xgroup_create(stream, self._keys.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stop(self) -> None:
        """Stop pulling; run() returns after its current read."""
        self._stopping = True

    async def run(self) -> None:
        """Read and dispatch requests (the queue's, and turns handed to this worker) until stop()."""
        backoff = Backoff(0.1, 5.0)
        while not self._stopping:
            await self._in_flight.wait_below(self._max_in_flight)
            streams: dict[Any, Any] = {self._keys.requests: ">", self._inbox: ">"}
            try:
                response: Any = await self._redis.xreadgroup(
                    self._keys.group, self._consumer, streams, count=self.room, block=_BLOCK_MS
                )
                backoff.reset()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream was deleted under us (FLUSHALL, an operator, a Redis restart): join again.
                    await self.join_group()
                    continue
                if not is_transient(exc):
                    raise
                self._retrying("reading requests", exc, backoff)
                await backoff.wait()
                continue
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self._retrying("reading requests", exc, backoff)
                await backoff.wait()
                continue
            for stream, entries in _stream_entries(response):
                for entry_id, fields in entries:
                    await self._accept_until_done(Entry(entry_id, stream), fields)

    async def _accept_until_done(self, entry: Entry, fields: dict[bytes, bytes] | None) -> None:
        """Accept an entry, retrying while Redis is unreachable or refuses writes for a while: the entry is ours
        (in our PEL) and no other worker will claim it while we heartbeat, so giving up would strand it. An
        error that retrying cannot cure (WRONGTYPE on a key of the request's) fails this entry alone."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self._accept(entry, fields)
                return
            except RedisError as exc:
                if not is_transient(exc):
                    await self._fail_entry(entry, fields, exc)
                    return
                self._retrying(f"handling entry {entry.id!r}", exc, backoff)
                await backoff.wait()

    async def _fail_entry(self, entry: Entry, fields: dict[bytes, bytes] | None, error: RedisError) -> None:
        """Answer an entry that a Redis error on one of its keys kept from being served (`internal`), and ack it."""
        code = error_code(error)
        log.warning("entry %r failed: Redis refused a command on its keys (%s)", entry.id, code)
        data = (fields or {}).get(REQUEST_FIELD)
        sender = None if data is None else _identify_safely(data, self._keys, self._limits)
        # Only the error code: the reply text of Redis could quote a key that is not the client's.
        failure = ProtocolError(ErrorCode.INTERNAL, f"Redis refused a command on this request's keys ({code})")
        await self._reject_sender(entry, sender, failure)

    def _retrying(self, what: str, error: BaseException, backoff: Backoff) -> None:
        code = error_code(error)
        log.warning("%s failed (%s); retrying in %.1fs", what, code, backoff.delay_s)
        if self.metrics is not None:
            self.metrics.count_redis_retry(code)

    @property
    def room(self) -> int:
        """Requests this worker can take on now."""
        return self._max_in_flight - len(self._in_flight)

    async def accept_claimed(self, entry_id: bytes, fields: dict[bytes, bytes] | None, stream: str) -> None:
        """Serve an entry claimed from a dead worker: resumed after the events it had already published."""
        await self._accept_until_done(Entry(entry_id, stream, claimed=True), fields)

    async def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes] | None, stream: str) -> None:
        """Answer an entry delivered too often (every worker that took it died before answering) with
        `internal`, ack it and count it, instead of serving it again."""
        data = (fields or {}).get(REQUEST_FIELD)
        sender = None if data is None else _identify_safely(data, self._keys, self._limits)
        failure = ProtocolError(
            ErrorCode.INTERNAL, "every worker that took this request stopped before answering it; it is not retried"
        )
        if self.metrics is not None:
            self.metrics.count_dead_letter()
        await self._reject_sender(Entry(entry_id, stream, claimed=True), sender, failure)

    async def _accept(self, entry: Entry, fields: dict[bytes, bytes] | None) -> None:
        received_at = time.monotonic()
        data = (fields or {}).get(REQUEST_FIELD)
        if data is None:
            log.warning("entry %r has no %r field; acked and dropped", entry.id, REQUEST_FIELD)
            await self._reject(entry, None, ProtocolError(ErrorCode.INVALID_REQUEST, "no request"))
            return
        try:
            request = decode_request(data, self._keys, self._limits)
        except ProtocolError as exc:
            log.info("entry %r refused: %s", entry.id, exc.message)
            await self._reject_sender(entry, identify_sender(data, self._keys, self._limits), exc)
            return
        except Exception:  # a codec bug must cost one entry, never the intake that serves all
            log.exception("entry %r could not be decoded", entry.id)
            error = ProtocolError(ErrorCode.INVALID_REQUEST, "unreadable request")
            await self._reject_sender(entry, _identify_safely(data, self._keys, self._limits), error)
            return
        reply_key = self._keys.reply(request.client_id, request.id)
        if request.key in self._in_flight:
            # The same client reused a live id: answering would interleave with that request's own events.
            log.warning("duplicate request %s in flight; entry %r dropped", request.key, entry.id)
            await self._reject(entry, None, ProtocolError(ErrorCode.INVALID_REQUEST, "duplicate"))
            return
        cancel_key = self._keys.cancel(request.client_id, request.id)
        slot = TenantSlot(request.owner, request.key)
        if request.deadline is not None and time.time() >= request.deadline:
            error = ProtocolError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while the request was queued")
            await self._reject(entry, reply_key, error, slot)
            return
        if await self._read_and_cancelled(request, cancel_key):
            await self._publisher.answer(entry.id, reply_key, cancelled_before_start(), entry.stream, slot)
            return
        if request.kind is RequestKind.OP:
            ticket = Ticket(request.key, entry.id, reply_key, cancel_key, entry.stream, slot=slot)
            await self._run_op(entry, request, ticket, received_at)
            return
        if await self._hand_to_owner(entry, request, data):
            return
        try:
            request = await self._conversations.resolve(request)
        except ProtocolError as exc:
            await self._reject(entry, reply_key, exc, slot)
            return
        resume = await published_so_far(self._redis, reply_key) if entry.claimed else None
        if resume is not None and resume.finished:
            # The dead worker wrote the final event but died before its ack.
            await self._publisher.ack(entry.id, entry.stream, slot)
            return
        next_event = 0 if resume is None else resume.next_event
        self._in_flight.add(
            Ticket(request.key, entry.id, reply_key, cancel_key, entry.stream, next_event=next_event, slot=slot)
        )
        self._engine_loop.submit(request, received_at, resume)

    async def _read_and_cancelled(self, request: Request, cancel_key: str) -> bool:
        """Take the request out of its tenant's backlog (a worker has read it; it still counts as in flight), and
        tell whether its cancel key exists, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self._keys.tenant_backlog(request.owner), request.key)
        pipe.exists(cancel_key)
        _, cancelled = await pipe.execute()
        return bool(cancelled)

    async def _hand_to_owner(self, entry: Entry, request: Request, data: bytes) -> bool:
        """Send a conversation's turn to the live worker that holds its KV; True if it was handed over.

        Only entries of the shared queue move, and only once: a turn in an inbox is served where it is.
        """
        owned = request.owned_conversation
        if owned is None or entry.stream != self._keys.requests or entry.claimed:
            return False
        owner = await live_owner(self._redis, self._keys, owned)
        if owner is None or owner == self._consumer:
            return False
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._keys.inbox(owner), {REQUEST_FIELD: data})
        pipe.xack(self._keys.requests, self._keys.group, entry.id)
        pipe.xdel(self._keys.requests, entry.id)
        await pipe.execute()
        self.handed_over += 1
        return True

    async def _reject_sender(self, entry: Entry, sender: Sender | None, error: ProtocolError) -> None:
        """Answer an entry that failed validation, as far as it says who sent it (and give its slot back)."""
        if sender is None:
            await self._reject(entry, None, error)
        else:
            await self._reject(entry, sender.reply, error, TenantSlot(sender.owner, sender.key))

    async def _reject(
        self, entry: Entry, reply_key: str | None, error: ProtocolError, slot: TenantSlot | None = None
    ) -> None:
        await self._publisher.reject(entry.id, reply_key, error, entry.stream, slot)

    async def _run_op(self, entry: Entry, request: Request, ticket: Ticket, received_at: float) -> None:
        assert request.command is not None
        if request.command.op in STATE_OPS:
            # Saved KV is the engine's: the op runs on its thread, between steps, and answers like a request.
            self._in_flight.add(ticket)
            self._engine_loop.submit(request, received_at)
            return
        try:
            result = await self._conversations.run(request)
        except ProtocolError as exc:
            await self._reject(entry, ticket.reply_key, exc, ticket.slot)
            return
        assert request.owned_conversation is not None
        if request.command.op is ConversationOp.DELETE:
            self._engine_loop.forget(request.owned_conversation)
        event = ResultEvent(n=0, data=result)
        await self._publisher.answer(entry.id, ticket.reply_key, event, entry.stream, ticket.slot)


def _identify_safely(data: bytes, keys: Keys, limits: Limits) -> Sender | None:
    try:
        return identify_sender(data, keys, limits)
    except Exception:  # noqa: BLE001 - no identity is the safe answer for an entry that broke the codec
        return None


@dataclass(frozen=True)
class Entry:
    """Where a request entry came from: its id, its stream (the queue's or an inbox), and whether it was
    claimed from a dead worker."""

    id: bytes
    stream: str
    claimed: bool = False


def _stream_entries(response: Any) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes] | None]]]]:
    """XREADGROUP's reply as (stream name, entries), whichever RESP version redis-py spoke."""
    pairs = response.items() if isinstance(response, dict) else (response or [])
    result = []
    for name, entries in pairs:
        if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], list | tuple):
            entries = entries[0]
        result.append((name.decode() if isinstance(name, bytes) else str(name), list(entries)))
    return result
