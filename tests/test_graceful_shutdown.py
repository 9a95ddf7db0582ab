"""SIGTERM with requests in flight: each gets a final event, finished ones are acked, the worker exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from llamaq.client import Client
from llamaq.protocol import DoneEvent, FinishReason, Keys
from llamaq.worker.service import Worker

from .conftest import worker_output, worker_process, worker_settings
from .prompts import SHORT_PROMPTS

pytestmark = pytest.mark.slow


async def test_sigterm_finishes_in_flight_requests_and_exits_zero(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    # The drain timeout only bounds a hang: a loaded machine may take minutes for six short requests.
    with worker_process(redis_url, prefix, "--drain-timeout", "600") as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            handles = [await client.submit(prompt=p, max_tokens=30, temperature=0) for p in SHORT_PROMPTS[:6]]
            first = await anext(aiter(handles[0]))
            assert first.n == 0  # generation is under way when the signal lands
            worker.send_signal(signal.SIGTERM)
            finals = [[event async for event in handle][-1] for handle in handles[1:]]
        code = await asyncio.to_thread(worker.wait, 700)
        output = worker_output(worker)
    assert code == 0, output
    assert all(isinstance(f, DoneEvent) and f.finish_reason is not FinishReason.CANCELLED for f in finals), (
        finals,
        output,
    )
    keys = Keys(prefix=prefix)
    assert (await redis.xpending(keys.requests, keys.group))["pending"] == 0


async def test_drain_timeout_cancels_what_is_left(redis_url: str, prefix: str, redis: aioredis.Redis) -> None:
    with worker_process(redis_url, prefix, "--drain-timeout", "0.5") as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            handle = await client.submit(prompt="Count to 900: 1, 2, 3,", max_tokens=900, temperature=0)
            await anext(aiter(handle))
            worker.send_signal(signal.SIGTERM)
            events = [event async for event in handle]
        code = await asyncio.to_thread(worker.wait, 120)
    assert code == 0
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason is FinishReason.CANCELLED
    keys = Keys(prefix=prefix)
    assert (await redis.xpending(keys.requests, keys.group))["pending"] == 0


async def test_a_cancelled_worker_frees_its_model_only_after_the_engine_thread_stops(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    """Cancelling the worker's task mid-decode (not a graceful stop) used to free the model under the running
    engine thread: a segfault that took the whole process down."""
    worker = Worker(worker_settings(redis_url, model_path, prefix), out=open(os.devnull, "w"))  # noqa: SIM115
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    await ready.wait()
    async with Client.from_url(redis_url, prefix=prefix) as client:
        handle = await client.submit(prompt="Count to 900: 1, 2, 3,", max_tokens=900, temperature=0)
        async with handle:
            await anext(aiter(handle))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert worker.engine_loop is not None and not worker.engine_loop.alive
