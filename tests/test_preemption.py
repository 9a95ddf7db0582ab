"""Unified layout under KV pressure: sequences that outgrow the free cells are preempted and recomputed, and
every client still sees each of its tokens exactly once, in order."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from llamaq.client import Client
from llamaq.protocol import DoneEvent, Event, FinishReason, TokenEvent

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings

pytestmark = pytest.mark.slow

PROMPTS = [f"Write a long story about a lighthouse keeper named {name}." for name in ("Ann", "Bo", "Cy", "Di")]


async def test_requests_that_outgrow_the_cache_are_preempted_and_finish_intact(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    # 512 cells for four requests that each grow to ~270: they cannot all run to the end at once.
    settings = worker_settings(redis_url, model_path, prefix, n_ctx=512, parallel=4, kv_unified=True)
    streams: list[list[Event]] = [[] for _ in PROMPTS]
    async with running_worker(settings) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:

            async def one(index: int) -> None:
                handle = await client.submit(
                    messages=[{"role": "user", "content": PROMPTS[index]}],
                    max_tokens=240,
                    temperature=0.7,
                    seed=index,
                    stop=["THE END"],
                )
                streams[index] = [event async for event in handle]

            async with anyio.create_task_group() as group:
                for index in range(len(PROMPTS)):
                    group.start_soon(one, index)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
        loop = worker.engine_loop
        assert loop is not None
        preemptions, retries = loop.scheduler.preemptions, loop.decode_retries
    assert preemptions > 0, "the workload never ran out of cells; the test proves nothing"
    assert retries == 0
    for events in streams:
        assert [e.n for e in events] == list(range(len(events)))
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        tokens = [t for e in events if isinstance(e, TokenEvent) for t in e.tokens]
        assert len(tokens) == done.usage.completion_tokens
