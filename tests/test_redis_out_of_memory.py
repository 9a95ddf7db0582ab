"""Redis out of memory for a few seconds while a request streams (`maxmemory` below what it holds, `noeviction`:
every write that could grow memory is refused with OOM): the worker retries with backoff, the request in flight
completes once Redis takes writes again, and the next request is served."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from llamaq.client import Client, Completion, RequestFailed
from llamaq.protocol import TokenEvent
from llamaq.worker.embedded_valkey import EmbeddedValkey

from .conftest import scrape_samples, worker_metrics_port, worker_output, worker_process

pytestmark = pytest.mark.slow

OUT_OF_MEMORY_S = 3.0


async def test_a_request_streaming_while_redis_is_out_of_memory_completes_and_the_next_is_served(
    prefix: str,
) -> None:
    with EmbeddedValkey() as valkey, worker_process(valkey.url, prefix, "--threads", "1") as worker:
        admin = aioredis.Redis.from_url(valkey.url)
        async with Client.from_url(valkey.url, prefix=prefix) as client:
            handle = await client.submit(prompt="Count from 1 to 200: 1, 2, 3,", max_tokens=96, temperature=0)
            async with handle:
                events = aiter(handle)
                first = await anext(events)
                assert isinstance(first, TokenEvent)
                used = int((await admin.info("memory"))["used_memory"])
                await admin.config_set("maxmemory-policy", "noeviction")
                await admin.config_set("maxmemory", used // 2)
                with pytest.raises(OutOfMemoryError):
                    await admin.set("probe", "x")
                # A client is told at once (deploy/README.md, "When Valkey is full"), rather than left waiting.
                with pytest.raises(OutOfMemoryError):
                    await client.submit(prompt="Refused while Redis is full", max_tokens=4)
                await anyio.sleep(OUT_OF_MEMORY_S)
                await admin.config_set("maxmemory", 0)
                outcome: Completion | RequestFailed
                with anyio.fail_after(60):
                    try:
                        outcome = await handle.result()
                    except RequestFailed as failure:
                        outcome = failure
            with anyio.fail_after(60):
                after = await client.completion("The capital of France is", max_tokens=8, temperature=0)
        await admin.aclose()
        assert worker.poll() is None, worker_output(worker)
        samples = scrape_samples(worker_metrics_port(worker))
    assert isinstance(outcome, Completion), outcome
    assert outcome.usage.completion_tokens == 96
    assert after.usage.completion_tokens == 8
    retried = {labels: v for (name, labels), v in samples.items() if name == "llamaq_redis_retries_total"}
    assert retried[(("error", "OOM"),)] >= 1, retried
