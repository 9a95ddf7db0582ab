"""Crash recovery: requests pending on a worker whose heartbeat lapsed are claimed by a live one.

Gated on the heartbeat, never on idle time alone: a long generation leaves its entry idle for minutes on a
healthy worker. A consumer counts as dead only when its heartbeat is missing at two checks at least a heartbeat
TTL apart (so a Redis that lost its keys in a restart, and got them back at the next beat, kills nobody), and
XCLAIM's minimum idle time keeps two live workers from claiming the same entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llamaq.protocol import Keys

from .heartbeat import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S

log = logging.getLogger("llamaq.reclaimer")

CLAIM_MIN_IDLE_MS = 2_000
"""An entry claimed a moment ago by another live worker is not claimed again."""

Accept = Callable[[bytes, dict[bytes, bytes] | None, str], Awaitable[None]]
Room = Callable[[], int]


class Reclaimer:
    """Looks for dead consumers of the queue's group and hands their pending entries to the intake."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, consumer: str, room: Room, accept: Accept) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._room = room
        self._accept = accept
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
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

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
            if now - first_missed < HEARTBEAT_TTL_S:
                continue
            claimed += await self._claim_inbox(consumer)
            if pending == 0:
                # Nothing left to take over: the dead consumer only clutters XINFO.
                await self._redis.xgroup_delconsumer(self._keys.requests, self._keys.group, consumer)
                self._missing_since.pop(consumer, None)
                continue
            claimed += await self._claim_pending(self._keys.requests, consumer)
        self.claimed += claimed
        return claimed

    async def _consumers(self) -> dict[str, int]:
        try:
            listed: Any = await self._redis.xinfo_consumers(self._keys.requests, self._keys.group)
        except RedisError:
            return {}
        return {_text(c["name"]): int(c["pending"]) for c in listed}

    async def _claim_pending(self, stream: str, consumer: str) -> int:
        """Claim (up to our room) the entries of `stream` pending on a dead consumer, and serve them."""
        room = self._room()
        if room <= 0:
            return 0
        pending: Any = await self._redis.xpending_range(
            stream, self._keys.group, min="-", max="+", count=room, consumername=consumer
        )
        ids = [entry["message_id"] for entry in pending]
        if not ids:
            return 0
        entries: Any = await self._redis.xclaim(stream, self._keys.group, self._consumer, CLAIM_MIN_IDLE_MS, ids)
        log.warning("claimed %d requests pending on dead worker %s", len(entries), consumer)
        for entry_id, fields in entries:
            if fields is None:
                # Deleted from the stream meanwhile (acked and deleted): nothing to serve, only to ack.
                await self._redis.xack(stream, self._keys.group, entry_id)
                continue
            await self._accept(entry_id, fields, stream)
        return len(entries)

    async def _claim_inbox(self, consumer: str) -> int:
        """Take over a dead worker's inbox: turns handed to it that it had read (pending) or not yet read;
        the inbox is deleted once empty."""
        inbox = self._keys.inbox(consumer)
        if not await self._redis.exists(inbox):
            return 0
        claimed = await self._claim_pending(inbox, consumer)
        room = self._room()
        if room > 0:
            response: Any = await self._redis.xreadgroup(self._keys.group, self._consumer, {inbox: ">"}, count=room)
            for _name, entries in response or []:
                for entry_id, fields in entries:
                    await self._accept(entry_id, fields, inbox)
                    claimed += 1
        if await self._redis.xlen(inbox) == 0:
            await self._redis.delete(inbox)
        return claimed


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
