"""A worker's start, checked before the model loads: every failure a user can cause (a port in use, a model path or
a state directory that does not work, Redis unreachable or refusing the worker's user) becomes one StartupError
whose message says what to change; `llamaq worker` prints it as one line and exits 2, with no traceback.

Cheap checks come first, so a misconfigured worker fails in a moment rather than after loading gigabytes.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Awaitable
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from .embedded_valkey import EmbeddedValkey
from .engine import Engine, EngineConfig
from .health_server import HealthServer, Liveness, Readiness
from .metrics import WorkerMetrics

STARTUP_FAILED_EXIT_CODE = 2
"""`llamaq worker`'s exit code when it could not start (1: it started and then failed)."""

_GGUF_MAGIC = b"GGUF"


class StartupError(Exception):
    """The worker cannot start; the message is one line for the operator, naming the flag to change."""


def start_health_server(
    metrics: WorkerMetrics, host: str, port: int, liveness: Liveness, readiness: Readiness
) -> HealthServer:
    """Bind and serve /metrics, /healthz and /readyz; StartupError when the address cannot be bound."""
    server = HealthServer(metrics, host, port, liveness, readiness)
    try:
        server.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"the metrics port {port} on {host} is in use (another worker on this host?): pass --metrics-port "
                "with a free port, 0 to pick one, or --no-metrics (LLAMAQ_METRICS_PORT sets the default)"
            ) from exc
        raise StartupError(f"cannot serve metrics on {host}:{port} ({_reason(exc)}): check --metrics-host") from exc
    return server


def check_model_file(path: Path) -> Path:
    """The model path if it names a readable GGUF file; StartupError (naming --model) otherwise."""
    try:
        with open(path, "rb") as model:
            magic = model.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise StartupError(f"cannot read the model {path} ({_reason(exc)}): check --model") from exc
    if magic != _GGUF_MAGIC:
        raise StartupError(f"{path} is not a GGUF model file: check --model")
    return path


def check_state_dir(path: Path) -> None:
    """Create the state directory if need be and prove it writable; StartupError (naming --state-dir) if not."""
    probe = path / f".llamaq-write-check-{secrets.token_hex(4)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"the state directory {path} is not usable ({_reason(exc)}): check --state-dir") from exc


async def check_redis(redis: aioredis.Redis, shown_url: str) -> None:
    """One PING through the worker's own client; StartupError (naming --redis-url) if Redis does not answer it."""
    try:
        await redis.ping()
    except AuthenticationError as exc:
        raise StartupError(f"Redis at {shown_url} refused the credentials ({exc}): check --redis-url") from exc
    except ResponseError as exc:
        raise StartupError(
            f"Redis at {shown_url} refused the worker ({exc}): check the user and password in --redis-url"
        ) from exc
    except RedisError as exc:
        raise StartupError(
            f"cannot reach Redis at {shown_url} ({exc}): check --redis-url or REDIS_URL, or leave both unset for "
            "an embedded Valkey"
        ) from exc


async def joined(joining: Awaitable[None], shown_url: str) -> None:
    """Create the consumer groups; StartupError when Redis refuses (an ACL user without the queue's keys)."""
    try:
        await joining
    except ResponseError as exc:
        raise StartupError(
            f"Redis at {shown_url} refused to create the queue's consumer group ({exc}): check the worker's ACL "
            "user, --prefix and --queue"
        ) from exc


def embedded_valkey() -> EmbeddedValkey:
    """A started private Valkey, for a worker given no Redis URL."""
    try:
        return EmbeddedValkey().start()
    except RuntimeError as exc:
        raise StartupError(f"could not start an embedded Valkey ({exc}): pass --redis-url") from exc


def load_engine(config: EngineConfig) -> Engine:
    """The model and its context, loaded; StartupError when llama.cpp refuses them."""
    try:
        return Engine(config)
    except RuntimeError as exc:
        raise StartupError(f"{exc}: check --model, --n-ctx, --parallel and --n-gpu-layers") from exc


def _reason(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or 0) or type(exc).__name__
