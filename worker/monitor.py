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
from .heartbeat import WorkerIdentity, beat, beat_interval_s, remove
from .in_flight import InFlight
from .lease import Lease, parse_taken_member
from .metrics import WorkerMetrics
from .queue_stats import queue_depth
from .settings import WorkerSettings

log = logging.getLogger("llamaq.monitor")


class Monitor:
    """Runs every beat interval on the event loop; the probes read what it last saw."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: WorkerSettings,
        engine: Engine,
        engine_loop: EngineLoop,
        metrics: WorkerMetrics,
        lease: Lease,
        in_flight: InFlight,
    ) -> None:
        self._lease = lease
        self._in_flight = in_flight
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
        self.failure: str | None = None
        """Why the worker is stopping after one of its parts died; it is then neither alive nor ready."""
        self._redis_ok_at: float | None = None

    async def run(self) -> None:
        """Beat until cancelled; Redis errors are logged and retried at the next beat."""
        while True:
            await self.tick()
            await asyncio.sleep(beat_interval_s(self._settings.heartbeat_ttl_s))

    async def tick(self) -> None:
        """One heartbeat and one refresh of the gauges that come from Redis and the state directory."""
        try:
            sent_at = time.monotonic()
            lapsed = self._lease.lapsed(sent_at)
            await beat(
                self._redis, self._settings.keys, self.identity, self._engine_loop.load, self._settings.heartbeat_ttl_s
            )
            if lapsed:
                log.warning("the heartbeat lease had lapsed; checking which requests are still this worker's")
                self._lease.regained(sent_at, await self._taken())
                self._metrics.count_lease_lapse()
            else:
                self._lease.renewed(sent_at)
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
            try:
                entries = await asyncio.to_thread(state.swap.states.entries)
            except OSError as exc:
                # A broken state directory costs the swap tier, not the heartbeat.
                log.warning("could not list the state directory: %s", exc)
                self._metrics.count_state_dir_error("list")
                return
            self._metrics.set_conversations_on_disk(len({entry.conversation for entry in entries}))

    async def _taken(self) -> frozenset[tuple[str, bytes]]:
        """The entries other workers claimed from this one while its heartbeat was missing; read after a beat,
        when no more can be claimed, and then cleared."""
        key = self._settings.keys.taken(self.identity.worker)
        pipe = self._redis.pipeline(transaction=True)
        pipe.smembers(key)
        pipe.delete(key)
        members, _ = await pipe.execute()
        return frozenset(parse_taken_member(m) for m in members)

    async def leave(self) -> None:
        """Remove the heartbeat when the worker stops, so status and other workers see it gone at once."""
        with contextlib.suppress(RedisError):
            await remove(self._redis, self._settings.keys, self.identity.worker)

    def alive(self) -> bool:
        """Liveness: the engine thread runs and no part of the worker died (the process answering is the other
        half)."""
        return self.failure is None and self._engine_loop.alive

    def ready(self) -> tuple[bool, str]:
        """Readiness: model loaded and engine running, consumer group joined, Redis answered recently."""
        if self.failure is not None:
            return False, self.failure
        if not self._engine_loop.alive:
            return False, "engine thread not running"
        if not self.group_joined:
            return False, "consumer group not joined yet"
        if self._redis_ok_at is None or time.monotonic() - self._redis_ok_at > self._settings.heartbeat_ttl_s:
            return False, "Redis not reachable"
        return True, "ready"
