"""The worker's periodic look at itself: heartbeat to Redis, queue depth and disk states into the metrics, and
the answers to the health probes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llamaq.protocol import MAX_BACKLOG_FIELD, MAX_TENANT_BACKLOG_FIELD, MAX_TENANT_IN_FLIGHT_FIELD

from .engine import Engine
from .engine_loop import EngineLoop
from .heartbeat import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, WorkerIdentity, beat, remove
from .metrics import WorkerMetrics
from .queue_stats import queue_depth
from .settings import WorkerSettings

log = logging.getLogger("llamaq.monitor")


class Monitor:
    """Runs every HEARTBEAT_INTERVAL_S on the event loop; the probes read what it last saw."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: WorkerSettings,
        engine: Engine,
        engine_loop: EngineLoop,
        metrics: WorkerMetrics,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._engine_loop = engine_loop
        self._metrics = metrics
        self.identity = WorkerIdentity(
            worker=settings.consumer,
            model=engine.model_name,
            parallel=engine.n_seq_max,
            n_ctx=engine.n_ctx,
            kv_layout="unified" if settings.kv_unified else "per-sequence",
            started_at=time.time(),
        )
        self.group_joined = False
        self._redis_ok_at: float | None = None

    async def run(self) -> None:
        """Beat until cancelled; Redis errors are logged and retried at the next beat."""
        while True:
            await self.tick()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def tick(self) -> None:
        """One heartbeat and one refresh of the gauges that come from Redis and the state directory."""
        try:
            await beat(self._redis, self._settings.keys, self.identity, self._engine_loop.load)
            # Clients read the bounds from Redis; every worker restates them, so a restarted Redis has them again.
            bounds = {
                MAX_BACKLOG_FIELD: self._settings.max_backlog,
                MAX_TENANT_IN_FLIGHT_FIELD: self._settings.max_tenant_in_flight,
                MAX_TENANT_BACKLOG_FIELD: self._settings.max_tenant_backlog,
            }
            await self._redis.hset(self._settings.keys.config, mapping=bounds)  # type: ignore[arg-type]
            depth = await queue_depth(self._redis, self._settings.keys)
            self._metrics.set_backlog(depth.undelivered, depth.pending_by_consumer.get(self.identity.worker, 0))
            self._redis_ok_at = time.monotonic()
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)
        state = self._engine_loop.state
        if state is not None:
            entries = await asyncio.to_thread(state.swap.states.entries)
            self._metrics.set_conversations_on_disk(len({entry.conversation for entry in entries}))

    async def leave(self) -> None:
        """Remove the heartbeat when the worker stops, so status and other workers see it gone at once."""
        with contextlib.suppress(RedisError):
            await remove(self._redis, self._settings.keys, self.identity.worker)

    def alive(self) -> bool:
        """Liveness: the engine thread runs (the process answering is the other half)."""
        return self._engine_loop.alive

    def ready(self) -> tuple[bool, str]:
        """Readiness: model loaded and engine running, consumer group joined, Redis answered recently."""
        if not self._engine_loop.alive:
            return False, "engine thread not running"
        if not self.group_joined:
            return False, "consumer group not joined yet"
        if self._redis_ok_at is None or time.monotonic() - self._redis_ok_at > HEARTBEAT_TTL_S:
            return False, "Redis not reachable"
        return True, "ready"
