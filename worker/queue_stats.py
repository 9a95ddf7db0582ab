"""How deep a queue is, read from Redis alone: what the group has not been delivered yet, and what is pending."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llamaq.protocol import Keys


@dataclass(frozen=True)
class QueueDepth:
    """Entries of a request stream by state."""

    length: int
    """Entries in the stream (acked entries are deleted, so: undelivered plus pending)."""
    undelivered: int | None
    """Entries the consumer group has not read yet (XINFO GROUPS `lag`; None when the server cannot tell)."""
    pending: int
    """Entries read by some worker and not yet acked."""
    pending_by_consumer: dict[str, int]


async def queue_depth(redis: aioredis.Redis, keys: Keys) -> QueueDepth:
    """The request stream's depth; zeros for a queue no worker has created yet."""
    try:
        groups: Any = await redis.xinfo_groups(keys.requests)
    except ResponseError:
        return QueueDepth(0, 0, 0, {})
    length = int(await redis.xlen(keys.requests))
    group = next((g for g in groups if _text(g.get("name")) == keys.group), None)
    if group is None:
        return QueueDepth(length, length, 0, {})
    lag = group.get("lag")
    pending = int(group.get("pending") or 0)
    by_consumer: dict[str, int] = {}
    if pending:
        summary: Any = await redis.xpending(keys.requests, keys.group)
        for consumer in summary.get("consumers") or []:
            by_consumer[_text(consumer["name"])] = int(consumer["pending"])
    return QueueDepth(length, None if lag is None else int(lag), pending, by_consumer)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
