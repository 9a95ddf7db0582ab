"""Redis restarts mid-load and loses everything: the worker reconnects and keeps serving, clients reconnect,
and every request in flight ends with a clear outcome (completed, or an error saying it was lost), never a hang."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from llamaq.client import Client, Completion, RequestFailed
from llamaq.protocol import ErrorCode
from llamaq.worker.embedded_valkey import EmbeddedValkey

from .conftest import running_worker, scrape_samples, worker_settings

pytestmark = pytest.mark.slow


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_requests_in_flight_during_a_redis_restart_end_clearly_and_the_worker_goes_on(
    model_path: Path, prefix: str
) -> None:
    valkey = EmbeddedValkey().start()
    port = valkey.port
    # Two sequences and two waiting: of ten requests, six are still in the stream when Redis goes.
    settings = worker_settings(valkey.url, model_path, prefix, parallel=2, max_waiting=2)
    try:
        async with running_worker(settings) as worker, Client.from_url(valkey.url, prefix=prefix) as client:
            handles = [
                await client.submit(messages=chat(f"Tell a long story number {i}."), max_tokens=64, temperature=0)
                for i in range(10)
            ]
            await anyio.sleep(1.0)
            valkey.stop()
            await anyio.sleep(1.0)
            valkey = EmbeddedValkey(port=port).start()
            outcomes: list[Completion | RequestFailed] = []

            async def outcome(index: int) -> None:
                async with handles[index] as handle:
                    try:
                        outcomes.append(await handle.result())
                    except RequestFailed as failure:
                        outcomes.append(failure)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as group:
                    for index in range(len(handles)):
                        group.start_soon(outcome, index)
            after = await client.chat(chat("Still there?"), max_tokens=8, temperature=0)
            loop = worker.engine_loop
            assert loop is not None and loop.alive
    finally:
        valkey.stop()
    failures = [o for o in outcomes if isinstance(o, RequestFailed)]
    assert len(outcomes) == 10 and failures, "some requests were lost with Redis's state"
    assert all(f.code is ErrorCode.INTERNAL for f in failures)
    assert any("lost" in str(f) for f in failures)
    assert after.usage.completion_tokens > 0


async def test_a_request_streaming_through_a_redis_outage_longer_than_the_lease_completes(
    model_path: Path, prefix: str
) -> None:
    """The worker's lease lapses while Redis is down; back, Redis has lost everything, so nobody took the
    request from it: it goes on serving (fencing drops only what another worker claimed)."""
    valkey = EmbeddedValkey().start()
    port = valkey.port
    settings = worker_settings(valkey.url, model_path, prefix, heartbeat_ttl_s=2)
    try:
        async with running_worker(settings) as worker, Client.from_url(valkey.url, prefix=prefix) as client:
            handle = await client.submit(prompt="Count from 1 to 200: 1, 2, 3,", max_tokens=96, temperature=0)
            async with handle:
                await anext(aiter(handle))
                valkey.stop()
                await anyio.sleep(3.0)
                valkey = EmbeddedValkey(port=port).start()
                with anyio.fail_after(120):
                    result = await handle.result()
            assert worker.health_port is not None
            samples = await anyio.to_thread.run_sync(scrape_samples, worker.health_port)
    finally:
        valkey.stop()
    assert result.usage.completion_tokens == 96
    assert samples[("llamaq_lease_lapses_total", ())] >= 1
