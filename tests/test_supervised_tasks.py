"""Every long-lived part of a worker is supervised: when the publisher, the intake, the monitor (heartbeat), the
reclaimer or the engine thread dies, the worker turns unready and not alive, removes its heartbeat and exits
with code 1 for its supervisor to restart it, rather than living on as a zombie that keeps its heartbeat or
its requests. Each part is made to fail with an exception nothing expects, as a bug would."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode, Keys
from llamaq.worker import monitor
from llamaq.worker.engine_loop import EngineLoop
from llamaq.worker.heartbeat import live_workers
from llamaq.worker.intake import Intake
from llamaq.worker.publisher import Publisher
from llamaq.worker.reclaimer import Reclaimer
from llamaq.worker.service import Worker

from .conftest import worker_settings

pytestmark = pytest.mark.slow


class Bug(Exception):
    """What the broken part raises."""


BROKEN: dict[str, tuple[Any, str]] = {
    "publisher": (Publisher, "_publish"),
    "intake": (Intake, "_accept"),
    "monitor": (monitor, "beat"),
    "reclaimer": (Reclaimer, "check"),
    "engine": (EngineLoop, "_step"),
}
"""Where each part is broken: the call it makes at least every heartbeat interval or for every request."""


@pytest.mark.parametrize("part", list(BROKEN))
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's Bug
async def test_a_part_that_dies_makes_the_worker_unready_and_exit_non_zero(
    redis_url: str, model_path: Path, prefix: str, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    keys = Keys(prefix)
    settings = worker_settings(redis_url, model_path, prefix)
    worker = Worker(settings, out=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    ready = asyncio.Event()
    serving = asyncio.create_task(worker.run(on_ready=ready.set))
    with anyio.fail_after(60):
        await ready.wait()
        while settings.consumer not in await live_workers(redis, keys):
            await anyio.sleep(0.1)
    owner, name = BROKEN[part]

    def broken(*args: object, **kwargs: object) -> Any:
        raise Bug(f"{part} broken by the test")

    monkeypatch.setattr(owner, name, broken)
    async with Client.from_url(redis_url, prefix=prefix) as client:
        handle = await client.submit(prompt="Once upon a time", max_tokens=32, temperature=0)
        with anyio.fail_after(30):
            code = await serving
        assert worker.monitor is not None
        ready_now, reason = worker.monitor.ready()
        if part == "engine":
            # The engine thread's own crash handler answers its requests before the worker goes.
            with anyio.fail_after(10), pytest.raises(RequestFailed) as failed:
                async with handle:
                    await handle.result()
            assert failed.value.code is ErrorCode.INTERNAL
    assert code == 1
    assert not ready_now and not worker.monitor.alive()
    assert (part if part != "engine" else "engine thread") in reason, reason
    assert settings.consumer not in await live_workers(redis, keys), "the heartbeat is removed at once"
