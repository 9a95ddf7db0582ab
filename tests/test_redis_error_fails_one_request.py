"""A Redis error on one request's keys fails that request alone. A client that plants a plain string at its own
next reply key (its ACL user may write its own keys) makes the worker's XADD of that request's events fail with
WRONGTYPE: the request is dropped (no event can be written there), acked and counted, and every other request is
served, by one worker or by two, with the text it gets alone."""

from __future__ import annotations

import contextlib
import subprocess

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client, Completion
from llamaq.protocol import Keys
from llamaq.worker.heartbeat import live_workers

from .conftest import (
    enqueue_by_hand,
    hand_made_request,
    scrape_samples,
    worker_metrics_port,
    worker_output,
    worker_process,
)

pytestmark = pytest.mark.slow

PROMPTS = [f"List three facts about the number {n}:" for n in range(8)]
MAX_TOKENS = 16
PLANTED = b"planted by the client"


async def served(client: Client, prompts: list[str]) -> list[Completion]:
    """Every prompt's greedy completion, all in flight at once."""
    handles = [await client.submit(prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in prompts]
    results: list[Completion] = []
    for handle in handles:
        async with handle:
            results.append(await handle.result())
    return results


@pytest.mark.parametrize("n_workers", [1, 2])
async def test_a_plain_string_at_a_reply_key_fails_that_request_alone(
    redis_url: str, redis: aioredis.Redis, prefix: str, n_workers: int
) -> None:
    keys = Keys(prefix)
    planter = hand_made_request("planter-client-01", "planted-request-01", "Tell me a secret.", MAX_TOKENS)
    planted_key = keys.reply(planter.client_id, planter.id)
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(worker_process(redis_url, prefix, "--threads", "1")) for _ in range(n_workers)]
        with anyio.fail_after(30):
            while len(await live_workers(redis, keys)) < n_workers:
                await anyio.sleep(0.1)
        async with Client.from_url(redis_url, prefix=prefix) as client:
            with anyio.fail_after(120):
                # The planted request goes in among the others, so it shares their publishing round trips.
                first = [await client.submit(prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in PROMPTS[:4]]
                await redis.set(planted_key, PLANTED)
                await enqueue_by_hand(redis, keys, planter)
                handles = first + [
                    await client.submit(prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in PROMPTS[4:]
                ]
                results = []
                for handle in handles:
                    async with handle:
                        results.append(await handle.result())
                while await redis.xlen(keys.requests):
                    await anyio.sleep(0.1)
                again = await served(client, PROMPTS[:4])
        logs = "\n\n".join(worker_output(w) for w in workers)
        assert all(w.poll() is None for w in workers), logs
        dropped = sum(dropped_requests(w) for w in workers)
    assert [r.usage.completion_tokens for r in results] == [MAX_TOKENS] * len(PROMPTS)
    # Nobody got anyone else's events: the same prompts again give the same greedy texts.
    assert [r.text for r in again] == [r.text for r in results[:4]]
    assert dropped == 1, logs
    assert await redis.get(planted_key) == PLANTED, "the worker wrote nothing over the client's key"
    pending = await redis.xpending(keys.requests, keys.group)
    assert pending["pending"] == 0, "the dropped request was acked"


def dropped_requests(worker: subprocess.Popen[bytes]) -> float:
    samples = scrape_samples(worker_metrics_port(worker))
    return sum(v for (name, _), v in samples.items() if name == "llamaq_requests_dropped_total")
