"""Wiring and lifecycle of one worker: Redis, engine thread, intake, publisher, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from llamaq.client.connection import open_redis

from .conversations import ConversationStore
from .embedded_valkey import EmbeddedValkey
from .engine import Engine
from .engine_loop import EngineLoop
from .health_server import HealthServer
from .in_flight import InFlight
from .intake import Intake
from .kv_cache import KvCache
from .metrics import WorkerMetrics
from .model_files import default_model_path, model_digest
from .monitor import Monitor
from .publisher import Publisher
from .reclaimer import Reclaimer
from .settings import WorkerSettings
from .state_dir import StateDir
from .state_file import Fingerprint
from .state_keeper import StateKeeper
from .swap_tier import SwapTier

log = logging.getLogger("llamaq.worker")

READY_LINE = "llamaq worker ready"
"""Printed once the worker reads requests; scripts wait for it."""


class Worker:
    """One worker process's parts, started by run() and stopped by request_stop()."""

    def __init__(self, settings: WorkerSettings, out: TextIO = sys.stdout) -> None:
        self.settings = settings
        self._out = out
        self._stop_requests = 0
        self._stop_event: asyncio.Event | None = None
        self.engine_loop: EngineLoop | None = None
        self.metrics: WorkerMetrics | None = None
        self.monitor: Monitor | None = None
        self.intake: Intake | None = None
        self.health_port: int | None = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown; a second call cancels what is still running."""
        self._stop_requests += 1
        if self._stop_event is not None:
            self._stop_event.set()
        if self._stop_requests > 1 and self.engine_loop is not None:
            self.engine_loop.stop(drain_timeout_s=0.0)

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Serve until request_stop(); return the process exit code."""
        self._stop_event = asyncio.Event()
        with contextlib.ExitStack() as stack:
            url = self.settings.redis_url
            if url is None:
                url = stack.enter_context(EmbeddedValkey()).url
                self._say(f"started embedded Valkey at {url}")
            model_path = self.settings.model_path or default_model_path()
            engine = await asyncio.to_thread(Engine, self.settings.engine_config(model_path))
            stack.callback(self._close_engine, engine)
            return await self._serve(url, engine, on_ready)

    def _close_engine(self, engine: Engine) -> None:
        """Free the model once the engine thread has stopped: freeing it under a running decode segfaults (as
        when the worker's task is cancelled rather than stopped)."""
        loop = self.engine_loop
        if loop is not None and loop.alive:
            loop.stop(drain_timeout_s=0.0)
            if not loop.join(timeout_s=30):
                log.error("the engine thread did not stop; leaving the model loaded rather than freeing it under it")
                return
        engine.close()

    async def _serve(self, url: str, engine: Engine, on_ready: Callable[[], None] | None) -> int:
        settings = self.settings
        redis = open_redis(url, health_check_interval=30)
        in_flight = InFlight()

        async def detokenize(tokens: list[int]) -> str:
            def run() -> str:
                with engine.lock:
                    return engine.detokenize(tokens)

            return await asyncio.to_thread(run)

        conversations = ConversationStore(
            redis, settings.keys, settings.conversation_ttl_s, detokenize, settings.consumer
        )
        publisher = Publisher(redis, settings.keys, in_flight, settings.reply_ttl_s, conversations)
        state = await asyncio.to_thread(self._state_keeper_factory, engine)
        layout = "unified" if settings.kv_unified else "per-sequence"
        self.metrics = metrics = WorkerMetrics(engine.model_name, settings.consumer, kv_layout=layout)
        engine_loop = EngineLoop(
            engine, settings.n_batch, publisher.emit_threadsafe, settings.prefix_cache, state, metrics
        )
        publisher.engine_loop = engine_loop
        publisher.metrics = metrics
        self.engine_loop = engine_loop
        self.intake = intake = Intake(
            redis,
            settings.keys,
            settings.consumer,
            settings.limits,
            settings.max_in_flight,
            in_flight,
            engine_loop,
            publisher,
            conversations,
        )
        self.monitor = monitor = Monitor(redis, settings, engine, engine_loop, metrics)
        health = self._health_server(monitor, metrics)
        try:
            await intake.join_group()
            monitor.group_joined = True
            engine_loop.start()
            publishing = asyncio.create_task(publisher.run(), name="publisher")
            reading = asyncio.create_task(intake.run(), name="intake")
            await monitor.tick()  # the queue's bounds are in Redis before anyone is told the worker is ready
            monitoring = asyncio.create_task(monitor.run(), name="monitor")
            reclaimer = Reclaimer(redis, settings.keys, settings.consumer, lambda: intake.room, intake.accept_claimed)
            reclaiming = asyncio.create_task(reclaimer.run(), name="reclaimer")
            self._announce(url, engine)
            if health is not None:
                self._say(f"metrics on http://{settings.metrics_host}:{health.port}/metrics")
            if on_ready is not None:
                on_ready()
            crashed = await self._wait_for_stop(engine_loop, reading)
            monitoring.cancel()
            reclaiming.cancel()
            await monitor.leave()
            intake.stop()
            await reading
            engine_loop.stop(settings.drain_timeout_s if self._stop_requests < 2 else 0.0)
            await asyncio.to_thread(engine_loop.join)
            publisher.close_threadsafe()
            await publishing
            self._say("llamaq worker stopped")
            return 1 if crashed else 0
        finally:
            if health is not None:
                health.stop()
            await redis.aclose()

    @property
    def intake_handed_over(self) -> int:
        """Conversation turns this worker handed to the worker that holds their KV."""
        return 0 if self.intake is None else self.intake.handed_over

    def _health_server(self, monitor: Monitor, metrics: WorkerMetrics) -> HealthServer | None:
        s = self.settings
        if s.metrics_port is None:
            return None
        server = HealthServer(metrics, s.metrics_host, s.metrics_port, monitor.alive, monitor.ready)
        server.start()
        self.health_port = server.port
        return server

    def _state_keeper_factory(self, engine: Engine) -> Callable[[KvCache], StateKeeper] | None:
        """How the engine loop builds its swap tier, when a state directory is configured."""
        s = self.settings
        if s.state_dir is None:
            return None
        fingerprint = Fingerprint.of(model_digest(engine.config.model_path), **engine.config.kv_settings())
        swap = SwapTier(engine, StateDir(s.state_dir, s.state_dir_max_bytes), fingerprint, s.restore_tolerance)
        return lambda kv: StateKeeper(kv, swap, s.swap_min_tokens)

    async def _wait_for_stop(self, engine_loop: EngineLoop, reading: asyncio.Task[None]) -> bool:
        """Wait for a stop request; True if the engine thread or the intake died instead."""
        assert self._stop_event is not None
        while not self._stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), timeout=1.0)
            if not engine_loop.alive or reading.done():
                log.error("the engine thread or the intake stopped unexpectedly; shutting down")
                if reading.done() and reading.exception() is not None:
                    log.error("intake failed", exc_info=reading.exception())
                return True
        return False

    def _announce(self, url: str, engine: Engine) -> None:
        s = self.settings
        layout = "unified" if s.kv_unified else "per-sequence streams (batch-invariant)"
        self._say(
            f"model {engine.model_name}, n_ctx {engine.n_ctx}, parallel {engine.n_seq_max}, "
            f"window {engine.window} tokens per sequence, KV {s.kv_type.value} {layout}, "
            f"threads {s.threads}, step budget {s.n_batch} tokens, "
            f"prefix cache {'on' if s.prefix_cache else 'off'}"
        )
        if s.state_dir is not None:
            self._say(
                f"state directory {s.state_dir} (cap {s.state_dir_max_bytes >> 20} MiB), restores verified "
                f"against saved logits with tolerance {s.restore_tolerance}"
            )
        self._say(f"consumer {s.consumer} on {s.keys.requests} at {redacted(url)}")
        self._say(READY_LINE)

    def _say(self, line: str) -> None:
        print(line, file=self._out, flush=True)


def redacted(url: str) -> str:
    """A Redis URL fit for logs: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def run_worker(settings: WorkerSettings) -> int:
    """Run a worker in the foreground until SIGINT or SIGTERM; return its exit code."""
    worker = Worker(settings)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.request_stop)
        return await worker.run()

    return asyncio.run(main())
