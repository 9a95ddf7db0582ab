"""Per-tenant limits: a tenant's requests in flight (sent, not yet answered) and waiting (not yet read by a worker)
are bounded by the enqueue script, atomically; beyond them its next request gets `overloaded` at once, while
other tenants are served. One tenant flooding the queue then cannot hold another's request back for long."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client, RequestFailed
from llamaq.client.request_handle import RequestHandle
from llamaq.protocol import (
    MAX_TENANT_BACKLOG_FIELD,
    MAX_TENANT_IN_FLIGHT_FIELD,
    DoneEvent,
    ErrorCode,
    Keys,
    TokenEvent,
    owner_of,
)

from .conftest import running_worker, worker_settings

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A prompt the model continues without an end-of-generation token, so every request runs its max_tokens."""
FLOOD = 10
"""Requests of the flooding tenant."""


@pytest.fixture
async def bounded(redis_url: str, prefix: str) -> AsyncIterator[tuple[Keys, aioredis.Redis]]:
    """A queue with no worker whose config allows a tenant 3 requests in flight, 2 of them waiting."""
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url)
    await redis.hset(keys.config, mapping={MAX_TENANT_IN_FLIGHT_FIELD: 3, MAX_TENANT_BACKLOG_FIELD: 2})
    yield keys, redis
    await redis.aclose()


async def overloaded(client: Client, **options: object) -> str:
    """The message of an `overloaded` refusal of the next submit."""
    started = time.monotonic()
    with pytest.raises(RequestFailed) as refused:
        await client.submit(prompt="x", max_tokens=1, **options)  # type: ignore[arg-type]
    assert refused.value.code is ErrorCode.OVERLOADED and time.monotonic() - started < 2.0
    return refused.value.message


async def test_a_tenant_beyond_its_limits_is_refused_and_others_are_not(
    bounded: tuple[Keys, aioredis.Redis], redis_url: str
) -> None:
    """The worker's side is played by hand: reading an entry takes it out of the tenant's backlog, answering it
    out of its in-flight set, exactly as worker/intake.py and worker/publisher.py do."""
    keys, redis = bounded
    acme = owner_of("acme", "unused00")
    async with Client.from_url(redis_url, prefix=keys.prefix, tenant="acme") as client:
        first = [await client.submit(prompt="x", max_tokens=1) for _ in range(2)]
        assert "waiting in the queue" in await overloaded(client)
        other = await client.submit(prompt="x", max_tokens=1, tenant="globex")
        await redis.zrem(keys.tenant_backlog(acme), f"{client.client_id}/{first[0].id}")  # a worker read it
        third = await client.submit(prompt="x", max_tokens=1)
        assert "in flight" in await overloaded(client)
        for handle in first:  # a worker answered them: out of both sets
            for counted in (keys.tenant_in_flight(acme), keys.tenant_backlog(acme)):
                await redis.zrem(counted, f"{client.client_id}/{handle.id}")
        fourth = await client.submit(prompt="x", max_tokens=1)
        # A slot past its lifetime (a request lost with its entry) counts no more.
        await redis.zadd(keys.tenant_in_flight(acme), {"lost-client/lost-request": 1})
        assert await redis.zcard(keys.tenant_in_flight(acme)) == 3
        await redis.zrem(keys.tenant_backlog(acme), f"{client.client_id}/{third.id}")
        await client.submit(prompt="x", max_tokens=1)
        assert await redis.zscore(keys.tenant_in_flight(acme), "lost-client/lost-request") is None
        for handle in (*first, other, third, fourth):
            await handle.aclose()
    assert await redis.xlen(keys.requests) == 6


async def test_concurrent_submits_of_one_tenant_never_pass_its_limit(
    bounded: tuple[Keys, aioredis.Redis], redis_url: str
) -> None:
    keys, redis = bounded
    accepted: list[RequestHandle] = []
    refused: list[RequestFailed] = []

    async def one(client: Client) -> None:
        try:
            accepted.append(await client.submit(prompt="x", max_tokens=1))
        except RequestFailed as failure:
            refused.append(failure)

    clients = [Client.from_url(redis_url, prefix=keys.prefix, tenant="initech") for _ in range(4)]
    async with clients[0], clients[1], clients[2], clients[3], anyio.create_task_group() as group:
        for index in range(24):
            group.start_soon(one, clients[index % 4])
    assert len(accepted) == 2 and len(refused) == 22
    assert await redis.zcard(keys.tenant_backlog(owner_of("initech", "unused00"))) == 2


@pytest.mark.slow
async def test_a_flooding_tenant_cannot_hold_another_tenants_request_back(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    """One tenant keeps as many requests in flight as it may (it retries whatever is refused); another tenant's
    one request arrives behind them. The worker holds 3 requests (2 running, 1 waiting), the flood may have 4 in
    flight, 2 of them unread, so the calm request waits behind 2 flood entries at most; once read, the worker
    admits it before the flood's next (fewest running first). Its first token comes within 4 of the flood's
    completions (3, and one more that ends in the same step), long before the flood drains. Without the limits
    it waited behind the whole flood: its first token came after 8 completions or more. The worker gives back
    every slot it took."""
    settings = worker_settings(
        redis_url,
        model_path,
        prefix,
        parallel=2,
        max_waiting=1,
        max_tenant_in_flight=4,
        max_tenant_backlog=2,
        threads=1,
    )
    keys = Keys(prefix)
    finished: list[str] = []
    calm_first_token_after: list[int] = []
    async with running_worker(settings), Client.from_url(redis_url, prefix=prefix) as client:

        async def flood_one(index: int) -> None:
            handle = await client.submit(
                prompt=COUNTING, max_tokens=8, temperature=0, tenant="flood", wait_if_overloaded=True, deadline_s=600
            )
            async with handle:
                await handle.result()
            finished.append(f"flood-{index}")

        async def calm() -> None:
            handle = await client.submit(prompt=COUNTING, max_tokens=4, temperature=0, tenant="calm")
            async with handle:
                async for event in handle:
                    if isinstance(event, TokenEvent) and not calm_first_token_after:
                        calm_first_token_after.append(len(finished))
                    if isinstance(event, DoneEvent):
                        break
            finished.append("calm")

        redis = aioredis.Redis.from_url(redis_url)
        try:
            async with anyio.create_task_group() as group:
                for index in range(FLOOD):
                    group.start_soon(flood_one, index)
                with anyio.fail_after(120):  # the flood fills its share: 4 in flight, 1 of them still in the stream
                    while await redis.zcard(keys.tenant_backlog(owner_of("flood", client.client_id))) < 1:
                        await anyio.sleep(0.05)
                group.start_soon(calm)
            in_flight = [
                await redis.zcard(keys.tenant_in_flight(owner_of(t, client.client_id))) for t in ("flood", "calm")
            ]
        finally:
            await redis.aclose()
    assert len(finished) == FLOOD + 1
    assert calm_first_token_after[0] <= 4, f"the calm tenant's first token came after {calm_first_token_after}"
    assert finished.index("calm") < FLOOD, "served before the flood drained"
    assert in_flight == [0, 0], "every slot was given back"


@pytest.mark.slow
async def test_every_way_a_request_is_answered_gives_its_slot_back(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    """With one request in flight allowed, a tenant can go on sending only if each answer gave the slot back:
    requests the worker refuses as malformed, an op it refuses, one whose deadline passed in the queue, a stored
    turn. Before, a refused malformed request kept its slot for an hour."""
    settings = worker_settings(redis_url, model_path, prefix, max_tenant_in_flight=1, max_tenant_backlog=1)
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with running_worker(settings), Client.from_url(redis_url, prefix=prefix, tenant="acme") as client:
            for _ in range(3):
                with pytest.raises(RequestFailed) as malformed:
                    await client.completion("x", max_tokens=1, top_p=7.0)
                assert malformed.value.code is ErrorCode.INVALID_REQUEST
            with pytest.raises(RequestFailed) as unknown:
                await client.get_conversation("never-talked")
            assert unknown.value.code is ErrorCode.INVALID_REQUEST
            with pytest.raises(RequestFailed) as late:
                await client.completion("x", max_tokens=1, deadline_s=0.000001)
            assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
            await client.chat([{"role": "user", "content": "Hi"}], conversation="acme-chat-1", max_tokens=2)
            assert (await client.completion("x", max_tokens=1)).usage.completion_tokens == 1
        owner = owner_of("acme", "unused00")
        assert [await redis.zcard(k) for k in (keys.tenant_in_flight(owner), keys.tenant_backlog(owner))] == [0, 0]
    finally:
        await redis.aclose()
