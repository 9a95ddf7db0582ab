"""Which workers serve the queue, from their heartbeats in Redis, read at most once a second for all calls.

A call that finds no live worker gets a 503 at once instead of waiting in a stream nobody reads; a second of
staleness costs nothing next to a worker's heartbeat TTL (10 s).
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from llamaq.protocol import Keys
from llamaq.worker.heartbeat import live_workers

from .gateway_openai import ApiError


class WorkerPresence:
    """The queue's live workers from their heartbeats, read at most once per `max_age_s` for all calls."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, max_age_s: float = 1.0) -> None:
        self._redis = redis
        self._keys = keys
        self._max_age_s = max_age_s
        self._workers: dict[str, dict[str, str]] = {}
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def workers(self) -> dict[str, dict[str, str]]:
        """Live workers and their heartbeat fields; RedisError when Redis cannot be reached."""
        async with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= self._max_age_s:
                self._workers = await live_workers(self._redis, self._keys)
                self._read_at = now
            return self._workers

    async def require(self) -> dict[str, dict[str, str]]:
        """Live workers, or a 503 when there is none."""
        workers = await self.workers()
        if not workers:
            raise ApiError(
                503,
                f"no worker is serving queue {self._keys.queue!r}; try again later",
                type="server_error",
                code="no_worker",
                headers={"Retry-After": "5"},
            )
        return workers
