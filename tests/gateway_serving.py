"""A worker and a gateway in front of it, both serving in the test's event loop, for the gateway's tests."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from llamaq.client.gateway import GatewaySettings, running_gateway
from llamaq.worker.service import Worker

from .conftest import running_worker, worker_settings


@dataclass(frozen=True)
class Served:
    """A gateway's base URL and the worker behind it."""

    url: str
    worker: Worker
    redis_url: str
    prefix: str

    @property
    def api(self) -> str:
        """The OpenAI base URL (what `OpenAI(base_url=...)` takes)."""
        return f"{self.url}/v1"

    def worker_count(self, name: str, **labels: str) -> float:
        """A sample of the worker's metrics (0 when absent)."""
        metrics = self.worker.metrics
        assert metrics is not None
        value = metrics.registry.get_sample_value(name, {"model": metrics.model, **labels})
        return value or 0.0


@contextlib.asynccontextmanager
async def serving(redis_url: str, model_path: Path, **worker_overrides: object) -> AsyncIterator[Served]:
    """A test worker (4 sequences of 1024 cells, one thread) on a prefix of its own, and a gateway without keys."""
    prefix = f"g{secrets.token_hex(4)}"
    # One engine thread: llama.cpp's threads wait for each other at every step, so on a shared 2-core machine a
    # second thread that loses its core to another process slows every step many times over.
    settings = worker_settings(redis_url, model_path, prefix, **{"threads": 1, **worker_overrides})
    async with (
        running_worker(settings) as worker,
        running_gateway(GatewaySettings(redis_url, prefix=prefix, process_metrics=False)) as url,
    ):
        yield Served(url, worker, redis_url, prefix)
