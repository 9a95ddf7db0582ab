"""Several workers on one queue: a conversation's turns go to the worker that holds its KV while it lives (its
heartbeat is the lease), whichever worker reads them, and to any worker once it is gone."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client
from llamaq.protocol import Keys, TokenEvent, owned_conversation, owner_of
from llamaq.worker.heartbeat import live_workers

from .conftest import running_worker, worker_settings

pytestmark = pytest.mark.slow


def turn(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Turn {index}: tell me one fact about the sea."}]


async def test_a_turn_read_by_another_worker_is_handed_to_the_owner_and_moves_on_when_it_is_gone(
    redis_url: str, model_path: Path, prefix: str, tmp_path: Path
) -> None:
    """Deterministic: the owner has room for one request and is kept busy, so only the other worker can read
    the next turn; it must hand the turn over, and the owner serves it from the KV it kept (swapped to its
    state directory while its one sequence served the busy request)."""
    owner_settings = worker_settings(
        redis_url, model_path, prefix, parallel=1, max_waiting=0, state_dir=tmp_path, swap_min_tokens=8
    )
    other_settings = worker_settings(redis_url, model_path, prefix)
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url)
    async with Client.from_url(redis_url, prefix=prefix) as client:
        held = owned_conversation(owner_of(None, client.client_id), "owned-chat")
        async with running_worker(owner_settings) as owner:
            first = await client.chat(turn(0), conversation="owned-chat", append=True, max_tokens=12)
            busy = await client.submit(prompt="Count to 500: 1, 2, 3,", max_tokens=500, temperature=0)
            async with busy:
                await anext(aiter(busy))  # the owner's only slot is taken: it reads nothing more for now
                async with running_worker(other_settings) as other:
                    with anyio.fail_after(30):
                        while len(await live_workers(redis, keys)) < 2:
                            await anyio.sleep(0.1)
                    handle = await client.submit(
                        messages=turn(1), conversation="owned-chat", append=True, max_tokens=12
                    )
                    async with handle:
                        with anyio.fail_after(30):
                            while other.intake_handed_over == 0:
                                await anyio.sleep(0.05)
                        await busy.cancel()
                        second = await handle.result()
                    owner_id = (await redis.get(keys.owner(held))).decode()
                    events = [event async for event in busy if isinstance(event, TokenEvent)]
            assert owner.intake_handed_over == 0
        # The owner is gone: the next turn is served by the other worker, rebuilt from the history in Redis.
        async with running_worker(other_settings) as survivor:
            third = await client.chat(turn(2), conversation="owned-chat", append=True, max_tokens=12)
            history = await client.get_conversation("owned-chat")
            assert survivor.intake_handed_over == 0
    new_owner = (await redis.get(keys.owner(held))).decode()
    await redis.aclose()
    assert events is not None
    assert owner_id == owner_settings.consumer and new_owner == other_settings.consumer
    assert second.usage.cached_tokens >= first.usage.prompt_tokens, "the owner served it from its KV"
    assert second.usage.prefix_source == "disk"
    assert third.usage.cached_tokens < third.usage.prompt_tokens // 2, "rebuilt: only the template's opening"
    assert len(history["messages"]) == 6
