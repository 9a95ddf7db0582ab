"""A worker's heartbeat in Redis: who it is, what it runs, its capacity and its load, refreshed every few seconds.

The heartbeat is a hash with a TTL under the queue's hash tag, listed in the queue's set of workers, so
`llamaq status` (and, later, crash recovery) finds every live worker with a handful of commands in one slot. A
worker whose hash expired is gone; readers remove it from the set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from llamaq.protocol import Keys

HEARTBEAT_TTL_S = 10
"""The default lease (`--heartbeat-ttl`): a worker whose heartbeat is older is gone."""


def beat_interval_s(ttl_s: float) -> float:
    """How often a worker beats for a lease of ttl_s: several missed beats before it counts as gone, since a busy
    event loop may delay one."""
    return ttl_s / 5


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker is doing now, as its engine thread last saw it."""

    running: int = 0
    waiting: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    sequences_in_use: int = 0
    conversations_cached: int = 0


@dataclass(frozen=True)
class WorkerIdentity:
    """What does not change while a worker runs."""

    worker: str
    model: str
    parallel: int
    n_ctx: int
    kv_layout: str
    started_at: float


async def beat(
    redis: aioredis.Redis, keys: Keys, identity: WorkerIdentity, load: WorkerLoad, ttl_s: int = HEARTBEAT_TTL_S
) -> None:
    """Write one heartbeat (hash, TTL, membership) in one round trip."""
    key = keys.heartbeat(identity.worker)
    fields: dict[str | bytes, str | int | float] = {
        **{name: value for name, value in vars(identity).items()},
        **{name: value for name, value in vars(load).items()},
        "updated_at": time.time(),
    }
    pipe = redis.pipeline(transaction=False)
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
    pipe.expire(key, ttl_s)
    pipe.sadd(keys.workers, identity.worker)
    await pipe.execute()


async def remove(redis: aioredis.Redis, keys: Keys, worker: str) -> None:
    """Take a stopping worker's heartbeat away at once, so nobody waits for it to expire."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(keys.heartbeat(worker))
    pipe.srem(keys.workers, worker)
    await pipe.execute()


async def live_workers(redis: aioredis.Redis, keys: Keys) -> dict[str, dict[str, str]]:
    """Every worker whose heartbeat has not expired, with its fields; expired ones leave the set."""
    raw: set[bytes | str] = await redis.smembers(keys.workers)
    members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)
    pipe = redis.pipeline(transaction=False)
    for worker in members:
        pipe.hgetall(keys.heartbeat(worker))
    found: dict[str, dict[str, str]] = {}
    gone = []
    for worker, fields in zip(members, await pipe.execute(), strict=True):
        if fields:
            found[worker] = {k.decode(): v.decode() for k, v in fields.items()}
        else:
            gone.append(worker)
    if gone:
        await redis.srem(keys.workers, *gone)
    return found
