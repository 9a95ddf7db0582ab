"""Several workers on one queue: a conversation's turns go to the worker that holds its KV while it lives (its
heartbeat is the lease), whichever worker reads them, and to any worker once it is gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from llamaq.client import Client
from llamaq.protocol import Keys

from .conftest import running_worker, worker_settings

pytestmark = pytest.mark.slow

NAMES = [f"owned-chat-{i}" for i in range(6)]


def turn(name: str, index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{name}, turn {index}: tell me one fact about the sea."}]


async def test_turns_follow_the_worker_that_holds_the_kv_and_move_on_when_it_is_gone(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    first = worker_settings(redis_url, model_path, prefix, parallel=8, n_ctx=8192)
    second = worker_settings(redis_url, model_path, prefix, parallel=8, n_ctx=8192)
    redis = aioredis.Redis.from_url(redis_url)
    async with Client.from_url(redis_url, prefix=prefix) as client, running_worker(second) as worker_b:
        async with running_worker(first) as worker_a:
            usages = {}
            for index in range(3):
                for name in NAMES:
                    done = await client.chat(turn(name, index), conversation=name, append=True, max_tokens=12)
                    usages[name, index] = done.usage
            owners = {name: (await redis.get(Keys(prefix).owner(name))).decode() for name in NAMES}
            handed = sum(w.intake_handed_over for w in (worker_a, worker_b))
        # Worker A stopped: its conversations' next turns are served by B, rebuilt from their history.
        orphan = next(name for name in NAMES if owners[name] == first.consumer)
        after = await client.chat(turn(orphan, 3), conversation=orphan, append=True, max_tokens=12)
        history = await client.get_conversation(orphan)
        new_owner = (await redis.get(Keys(prefix).owner(orphan))).decode()
    await redis.aclose()
    for name in NAMES:
        for index in (1, 2):
            assert usages[name, index].cached_tokens > usages[name, index - 1].prompt_tokens // 2, (name, index)
    assert handed > 0, "some turns were read by the worker that does not hold their KV, and handed over"
    assert set(owners.values()) <= {first.consumer, second.consumer}
    # Only the template's opening, shared with B's own conversations, was cached: the history was recomputed.
    assert after.usage.cached_tokens < after.usage.prompt_tokens // 2 and new_owner == second.consumer
    assert len(history["messages"]) == 8
