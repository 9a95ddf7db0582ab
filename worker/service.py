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

import redis.asyncio as aioredis

from llamaq.client.connection import open_redis

from .conversations import ConversationStore
from .engine import Engine
from .engine_loop import EngineLoop
from .health_server import HealthServer
from .heartbeat import beat_interval_s
from .in_flight import InFlight
from .intake import Intake
from .kv_cache import KvCache
from .lease import Lease
from .metrics import WorkerMetrics
from .model_files import default_model_path, model_digest
from .monitor import Monitor
from .publisher import Publisher
from .reclaimer import Reclaimer
from .settings import WorkerSettings
from .startup import (
    STARTUP_FAILED_EXIT_CODE,
    StartupError,
    check_model_file,
    check_redis,
    check_state_dir,
    embedded_valkey,
    joined,
    load_engine,
    start_health_server,
)
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
        self._publisher: Publisher | None = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown; a second call cancels what is still running."""
        self._stop_requests += 1
        if self._stop_event is not None:
            self._stop_event.set()
        if self._stop_requests > 1 and self.engine_loop is not None:
            self.engine_loop.stop(drain_timeout_s=0.0)

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Serve until request_stop(); return the process exit code. StartupError when it cannot start."""
        self._stop_event = asyncio.Event()
        s = self.settings
        with contextlib.ExitStack() as stack:
            try:
                model_path = check_model_file(s.model_path or default_model_path())
            except FileNotFoundError as exc:  # the default model's package is missing
                raise StartupError(str(exc)) from exc
            layout = "unified" if s.kv_unified else "per-sequence"
            self.metrics = metrics = WorkerMetrics(model_path.stem, s.consumer, kv_layout=layout)
            # The port first: a second worker on a host fails at once, and probes answer while the model loads.
            health = None
            if s.metrics_port is not None:
                health = start_health_server(metrics, s.metrics_host, s.metrics_port, self._alive, self._ready)
                stack.callback(health.stop)
                self.health_port = health.port
            if s.state_dir is not None:
                check_state_dir(s.state_dir)
            url = s.redis_url
            if url is None:
                url = stack.enter_context(embedded_valkey()).url
                self._say(f"started embedded Valkey at {url}")
            redis = open_redis(url, health_check_interval=30)
            try:
                await check_redis(redis, redacted(url))
                engine = await asyncio.to_thread(load_engine, s.engine_config(model_path))
                stack.callback(self._close_engine, engine)
                return await self._serve(url, redis, engine, metrics, health, on_ready)
            finally:
                await redis.aclose()

    def _alive(self) -> bool:
        """Liveness: the monitor's answer once there is one (a loading worker is alive)."""
        return True if self.monitor is None else self.monitor.alive()

    def _ready(self) -> tuple[bool, str]:
        """Readiness: the monitor's answer once there is one."""
        return (False, "loading the model") if self.monitor is None else self.monitor.ready()

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

    async def _serve(
        self,
        url: str,
        redis: aioredis.Redis,
        engine: Engine,
        metrics: WorkerMetrics,
        health: HealthServer | None,
        on_ready: Callable[[], None] | None,
    ) -> int:
        settings = self.settings
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
        state = await asyncio.to_thread(self._state_keeper_factory, engine, metrics)
        engine_loop = EngineLoop(
            engine, settings.n_batch, publisher.emit_threadsafe, settings.prefix_cache, state, metrics
        )
        publisher.engine_loop = engine_loop
        publisher.metrics = metrics
        self._publisher = publisher
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
        intake.metrics = metrics
        ttl_s = settings.heartbeat_ttl_s
        lease = Lease(ttl_s, margin_s=beat_interval_s(ttl_s))
        publisher.lease = lease
        monitor = Monitor(redis, settings, engine, engine_loop, metrics, lease, in_flight)
        await joined(intake.join_group(), redacted(url))
        self.monitor = monitor
        monitor.group_joined = True
        engine_loop.start()
        await monitor.tick()  # the queue's bounds are in Redis before anyone is told the worker is ready
        reclaimer = Reclaimer(
            redis,
            settings.keys,
            settings.consumer,
            lambda: intake.room,
            intake.accept_claimed,
            dead_letter=intake.dead_letter,
            max_deliveries=settings.max_deliveries,
            ttl_s=settings.heartbeat_ttl_s,
        )
        tasks = {
            "publisher": asyncio.create_task(publisher.run(), name="publisher"),
            "intake": asyncio.create_task(intake.run(), name="intake"),
            "monitor": asyncio.create_task(monitor.run(), name="monitor"),
            "reclaimer": asyncio.create_task(reclaimer.run(), name="reclaimer"),
        }
        if health is not None:
            self._say(f"metrics on http://{settings.metrics_host}:{health.port}/metrics")
        self._announce(url, engine)
        if on_ready is not None:
            on_ready()
        failure = await self._wait_for_stop(engine_loop, tasks)
        if failure is not None:
            monitor.failure = failure
            await self._abort(failure, engine_loop, monitor, tasks)
            return 1
        await self._shut_down(intake, engine_loop, monitor, publisher, tasks)
        self._say("llamaq worker stopped")
        return 0

    async def _shut_down(
        self,
        intake: Intake,
        engine_loop: EngineLoop,
        monitor: Monitor,
        publisher: Publisher,
        tasks: dict[str, asyncio.Task[None]],
    ) -> None:
        """The graceful stop: read nothing more, finish (or after the drain timeout cancel) what runs, write it.

        The heartbeat goes on until the last event is written: the requests draining are still this worker's,
        and a heartbeat removed early would let other workers take them over (and fence this one)."""
        await _cancel_all([tasks["reclaimer"]])
        intake.stop()
        await tasks["intake"]
        engine_loop.stop(self.settings.drain_timeout_s if self._stop_requests < 2 else 0.0)
        await asyncio.to_thread(engine_loop.join)
        publisher.close_threadsafe()
        await tasks["publisher"]
        await _cancel_all([tasks["monitor"]])
        await monitor.leave()

    async def _abort(
        self, failure: str, engine_loop: EngineLoop, monitor: Monitor, tasks: dict[str, asyncio.Task[None]]
    ) -> None:
        """Stop at once after a part died. When the engine thread crashed, the `internal` errors it emitted for
        its requests are written; otherwise nothing more is, so the requests in flight stay pending and a live
        worker resumes them once this one's heartbeat is gone (removed now rather than left to expire)."""
        log.error("%s; the worker stops (exit code 1) so that its supervisor restarts it", failure)
        self._say(f"llamaq worker failed: {failure}")
        publishing = tasks["publisher"]
        if not engine_loop.alive and not publishing.done() and self._publisher is not None:
            self._publisher.close_threadsafe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(publishing), timeout=10)
        await _cancel_all(list(tasks.values()))
        engine_loop.stop(drain_timeout_s=0.0)
        await monitor.leave()
        await asyncio.to_thread(engine_loop.join, 30)

    @property
    def intake_handed_over(self) -> int:
        """Conversation turns this worker handed to the worker that holds their KV."""
        return 0 if self.intake is None else self.intake.handed_over

    def _state_keeper_factory(self, engine: Engine, metrics: WorkerMetrics) -> Callable[[KvCache], StateKeeper] | None:
        """How the engine loop builds its swap tier, when a state directory is configured."""
        s = self.settings
        if s.state_dir is None:
            return None
        fingerprint = Fingerprint.of(model_digest(engine.config.model_path), **engine.config.kv_settings())
        swap = SwapTier(engine, StateDir(s.state_dir, s.state_dir_max_bytes), fingerprint, s.restore_tolerance)
        return lambda kv: StateKeeper(kv, swap, s.swap_min_tokens, metrics)

    async def _wait_for_stop(self, engine_loop: EngineLoop, tasks: dict[str, asyncio.Task[None]]) -> str | None:
        """Wait for a stop request; what failed instead, if the engine thread or a task ended first."""
        assert self._stop_event is not None
        stop = asyncio.create_task(self._stop_event.wait())
        try:
            while not self._stop_event.is_set():
                # The engine thread is polled; the tasks wake this wait as soon as one ends.
                await asyncio.wait([stop, *tasks.values()], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for name, task in tasks.items():
                    if task.done():
                        return _task_failure(name, task)
                if not engine_loop.alive:
                    return "the engine thread stopped unexpectedly"
            return None
        finally:
            stop.cancel()

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


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they have ended. Cancelled again while they run: redis-py can turn a
    cancellation inside a command into a ConnectionError, which a retry loop then takes for a Redis hiccup."""
    while not all(task.done() for task in tasks):
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=0.5)


def _task_failure(name: str, task: asyncio.Task[None]) -> str:
    """Why a task that should run until shutdown ended, as one line (its traceback goes to the log)."""
    if task.cancelled():
        return f"the {name} task was cancelled"
    error = task.exception()
    if error is None:
        return f"the {name} task returned"
    log.error("the %s task failed", name, exc_info=error)
    return f"the {name} task failed: {type(error).__name__}: {error}"


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

    try:
        return asyncio.run(main())
    except StartupError as exc:
        print(f"llamaq worker: {exc}", file=sys.stderr, flush=True)
        return STARTUP_FAILED_EXIT_CODE
