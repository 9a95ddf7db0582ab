"""Soak: 2,000 requests from 8 client processes across two worker processes, with random cancels. No request is
lost or answered twice, every event stream is gap-free, and the workers end at rest (nothing running, nothing
pending, nothing left in the stream)."""

from __future__ import annotations

import asyncio
import multiprocessing
import random

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client, RequestFailed
from llamaq.protocol import DoneEvent, ErrorEvent, Keys, TokenEvent
from llamaq.worker.heartbeat import live_workers

from .conftest import worker_process

pytestmark = pytest.mark.slow

CLIENTS = 8
REQUESTS_PER_CLIENT = 250
CONCURRENCY_PER_CLIENT = 16
CANCEL_SHARE = 0.1
# Two workers share two cores: one llama.cpp thread each keeps them from fighting over both.
ONE_THREAD = ("--parallel", "8", "--threads", "1")


def client_process(url: str, prefix: str, seed: int) -> list[tuple[str, str, bool]]:
    """One client process's requests: (request id, how it ended, whether its events were numbered 0..n)."""
    return asyncio.run(_client_requests(url, prefix, seed))


async def _client_requests(url: str, prefix: str, seed: int) -> list[tuple[str, str, bool]]:
    rng = random.Random(seed)
    outcomes: list[tuple[str, str, bool]] = []
    limit = anyio.Semaphore(CONCURRENCY_PER_CLIENT)
    async with Client.from_url(url, prefix=prefix) as client:

        async def one(index: int) -> None:
            async with limit:
                handle = await client.submit(prompt=f"Item {seed}-{index}: the", max_tokens=rng.randint(1, 3))
                cancel = rng.random() < CANCEL_SHARE
                numbers: list[int] = []
                ending = "none"
                async with handle:
                    try:
                        async for event in handle:
                            numbers.append(event.n)
                            if cancel and isinstance(event, TokenEvent | DoneEvent) and len(numbers) == 1:
                                await handle.cancel()
                            if isinstance(event, DoneEvent):
                                ending = event.finish_reason.value
                            elif isinstance(event, ErrorEvent):
                                ending = f"error:{event.code.value}"
                    except RequestFailed as failure:
                        ending = f"error:{failure.code.value}"
                outcomes.append((handle.id, ending, numbers == list(range(len(numbers)))))

        async with anyio.create_task_group() as group:
            for index in range(REQUESTS_PER_CLIENT):
                group.start_soon(one, index)
    return outcomes


async def test_two_thousand_requests_from_eight_processes_across_two_workers(redis_url: str, prefix: str) -> None:
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url)
    with worker_process(redis_url, prefix, *ONE_THREAD), worker_process(redis_url, prefix, *ONE_THREAD):
        with anyio.fail_after(30):
            while len(await live_workers(redis, keys)) < 2:
                await anyio.sleep(0.2)
        context = multiprocessing.get_context("spawn")
        with context.Pool(CLIENTS) as pool:
            results = await anyio.to_thread.run_sync(
                lambda: pool.starmap(client_process, [(redis_url, prefix, seed) for seed in range(CLIENTS)])
            )
        with anyio.fail_after(30):
            while True:
                workers = await live_workers(redis, keys)
                pending = (await redis.xpending(keys.requests, keys.group))["pending"]
                if pending == 0 and all(int(w["running"]) == 0 and int(w["waiting"]) == 0 for w in workers.values()):
                    break
                await anyio.sleep(0.5)
        stream_length = await redis.xlen(keys.requests)
    await redis.aclose()
    outcomes = [outcome for result in results for outcome in result]
    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT
    assert len({request_id for request_id, _, _ in outcomes}) == len(outcomes), "no request answered twice"
    endings = {ending for _, ending, _ in outcomes}
    assert endings <= {"stop", "length", "cancelled"}, endings
    assert "cancelled" in endings
    assert all(in_order for _, _, in_order in outcomes), "every stream numbered 0, 1, 2... without gaps"
    assert stream_length == 0 and all(int(w["sequences_in_use"]) == 0 for w in workers.values())
