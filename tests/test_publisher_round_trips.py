"""The publisher's Redis work per engine step stays flat in the number of streams: a reply stream's TTL is set with
its first and final events (not every event), and one EXISTS per client checks all its requests for a cancel.

Counted by the server itself (INFO commandstats of a private Valkey), so the test does not depend on timing.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import redis

from llamaq.client import Client
from llamaq.protocol import FinishReason
from llamaq.worker.embedded_valkey import EmbeddedValkey

from .conftest import running_worker, worker_settings

pytestmark = pytest.mark.slow

STREAMS = 8
TOKENS = 24


def command_calls(url: str) -> dict[str, int]:
    """Calls of each command since the last CONFIG RESETSTAT, as the server counted them."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_ttl_and_cancel_checks_do_not_grow_with_every_stream_and_step(model_path: Path, prefix: str) -> None:
    with EmbeddedValkey() as valkey:
        settings = worker_settings(valkey.url, model_path, prefix, parallel=STREAMS, n_ctx=STREAMS * 256)
        async with running_worker(settings) as worker, Client.from_url(valkey.url, prefix=prefix) as client:
            results = []

            async def one(k: int) -> None:
                results.append(
                    await client.completion(f"Item {k}: a list of fruit,", max_tokens=TOKENS, ignore_eos=True)
                )

            loop = worker.engine_loop
            assert loop is not None
            reset = redis.Redis.from_url(valkey.url)
            reset.config_resetstat()
            reset.close()
            decodes_before = loop.engine.decodes
            async with anyio.create_task_group() as group:
                for k in range(STREAMS):
                    group.start_soon(one, k)
            calls = command_calls(valkey.url)
            decodes = loop.engine.decodes - decodes_before
    assert [r.finish_reason for r in results] == [FinishReason.LENGTH] * STREAMS
    assert decodes >= TOKENS, "every stream took one decode step per token at least"
    # Before: one EXPIRE per reply stream per step (STREAMS * TOKENS) and one EXISTS per stream per step.
    # Now: a running TTL and a final TTL per stream; the client sets its wake key's TTL with each request it
    # sends, and the heartbeat takes a few.
    assert calls.get("expire", 0) <= 3 * STREAMS + 6, calls
    # The intake checks each request's cancel key once as it reads it; then one EXISTS per step for the client.
    assert calls.get("exists", 0) <= STREAMS + decodes + 6, (calls, decodes)
