"""Crash recovery: requests pending on a worker whose heartbeat lapsed are claimed by a live one.

Gated on the heartbeat, never on idle time alone: a long generation leaves its entry idle for minutes on a
healthy worker. A consumer counts as dead only when its heartbeat is missing at two checks at least a heartbeat
TTL apart (so a Redis that lost its keys in a restart, and got them back at the next beat, kills nobody), and
XCLAIM's minimum idle time keeps two live workers from claiming the same entry. The claim itself runs in a
transaction that watches the dead worker's heartbeat and records what it takes: a worker that was only paused
and beats again keeps every entry not taken by then (it fences itself until it has read which were, lease.py).

A dead consumer is forgotten (removed from the group) only once it holds nothing: no pending entry and no inbox,
since turns handed to it wait there. An entry delivered `max_deliveries` times (it was read, then claimed from
each worker that died holding it) is not served again: it goes to `dead_letter`, which answers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from llamaq.protocol import Keys

from .heartbeat import HEARTBEAT_TTL_S, beat_interval_s
from .lease import TAKEN_TTL_S, taken_member

log = logging.getLogger("llamaq.reclaimer")

CLAIM_MIN_IDLE_MS = 2_000
"""An entry claimed a moment ago by another live worker is not claimed again."""

Accept = Callable[[bytes, dict[bytes, bytes] | None, str], Awaitable[None]]
Room = Callable[[], int]


class Reclaimer:
    """Looks for dead consumers of the queue's group and hands their pending entries to the intake."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: str,
        room: Room,
        accept: Accept,
        *,
        dead_letter: Accept | None = None,
        max_deliveries: int = 0,
        ttl_s: float = HEARTBEAT_TTL_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._room = room
        self._accept = accept
        self._dead_letter = dead_letter
        self._max_deliveries = max_deliveries
        self._ttl_s = ttl_s
        self._missing_since: dict[str, float] = {}
        self.claimed = 0
        """Entries this worker took over from dead ones."""

    async def run(self) -> None:
        """Check every heartbeat interval until cancelled."""
        while True:
            try:
                await self.check()
            except RedisError as exc:
                log.warning("reclaim check failed: %s", exc)
            await asyncio.sleep(beat_interval_s(self._ttl_s))

    async def check(self) -> int:
        """Claim what dead consumers left pending, as far as there is room; how many entries were claimed."""
        consumers = await self._consumers()
        now = time.monotonic()
        claimed = 0
        for consumer, pending in consumers.items():
            if consumer == self._consumer:
                continue
            if await self._redis.exists(self._keys.heartbeat(consumer)):
                self._missing_since.pop(consumer, None)
                continue
            first_missed = self._missing_since.setdefault(consumer, now)
            if now - first_missed < self._ttl_s:
                continue
            inbox_claimed, inbox_left = await self._claim_inbox(consumer)
            claimed += inbox_claimed
            if pending:
                claimed += await self._claim_pending(self._keys.requests, consumer)
            elif not inbox_left:
                # Nothing left to take over: the dead consumer only clutters XINFO.
                await self._redis.xgroup_delconsumer(self._keys.requests, self._keys.group, consumer)
                self._missing_since.pop(consumer, None)
        self.claimed += claimed
        return claimed

    async def _consumers(self) -> dict[str, int]:
        try:
            listed: Any = await self._redis.xinfo_consumers(self._keys.requests, self._keys.group)
        except RedisError:
            return {}
        return {_text(c["name"]): int(c["pending"]) for c in listed}

    async def _claim_pending(self, stream: str, consumer: str) -> int:
        """Claim (up to our room) the entries of `stream` pending on a dead consumer, and serve them; entries
        delivered too often go to the dead letter instead, whatever the room."""
        room = self._room()
        pending: Any = await self._redis.xpending_range(
            stream, self._keys.group, min="-", max="+", count=max(room, 1) + 100, consumername=consumer
        )
        poison = {e["message_id"] for e in pending if self._too_often_delivered(int(e["times_delivered"]))}
        ids = [e["message_id"] for e in pending if e["message_id"] in poison] + [
            e["message_id"] for e in pending if e["message_id"] not in poison
        ][: max(room, 0)]
        if not ids:
            return 0
        entries = await self._claim_if_dead(stream, consumer, ids)
        if entries:
            log.warning("claimed %d requests pending on dead worker %s", len(entries), consumer)
        for entry_id, fields in entries:
            if fields is None:
                # Deleted from the stream meanwhile (acked and deleted): nothing to serve, only to ack.
                await self._redis.xack(stream, self._keys.group, entry_id)
            elif entry_id in poison and self._dead_letter is not None:
                log.error(
                    "entry %r of %s was delivered %d times without an answer", entry_id, stream, self._max_deliveries
                )
                await self._dead_letter(entry_id, fields, stream)
            else:
                await self._accept(entry_id, fields, stream)
        return len(entries)

    def _too_often_delivered(self, times_delivered: int) -> bool:
        return self._max_deliveries > 0 and times_delivered >= self._max_deliveries

    async def _claim_if_dead(self, stream: str, consumer: str, ids: list[Any]) -> list[Any]:
        """XCLAIM the ids for this worker, atomically with the check that the consumer's heartbeat is still
        missing; nothing if it beat again (it was paused, not dead)."""
        heartbeat = self._keys.heartbeat(consumer)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(heartbeat)
            if await pipe.exists(heartbeat):
                return []
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.xclaim(stream, self._keys.group, self._consumer, CLAIM_MIN_IDLE_MS, ids)
            # If the consumer was only paused, this tells it which of its requests are no longer its own.
            taken = self._keys.taken(consumer)
            pipe.sadd(taken, *(taken_member(stream, _bytes(i)) for i in ids))
            pipe.expire(taken, TAKEN_TTL_S)
            try:
                entries, _, _ = await pipe.execute()
            except WatchError:
                log.info("worker %s beat again while its requests were being claimed: it keeps them", consumer)
                return []
        claimed: list[Any] = entries
        return claimed

    async def _claim_inbox(self, consumer: str) -> tuple[int, bool]:
        """Take over a dead worker's inbox: turns handed to it that it had read (pending) or not yet read; the
        inbox is deleted once empty. How many entries were claimed, and whether the inbox still holds any."""
        inbox = self._keys.inbox(consumer)
        if not await self._redis.exists(inbox):
            return 0, False
        claimed = await self._claim_pending(inbox, consumer)
        room = self._room()
        if room > 0:
            response: Any = await self._redis.xreadgroup(self._keys.group, self._consumer, {inbox: ">"}, count=room)
            for _name, entries in response or []:
                for entry_id, fields in entries:
                    await self._accept(entry_id, fields, inbox)
                    claimed += 1
        # Entries this worker claimed stay in the inbox until served: the inbox goes when the last is acked.
        if await self._redis.xlen(inbox) == 0:
            await self._redis.delete(inbox)
            return claimed, False
        return claimed, True


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
