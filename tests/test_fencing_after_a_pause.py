"""A worker paused (SIGSTOP) past its heartbeat lease while it streams: the other worker claims its requests and
finishes them. Resumed (SIGCONT), the paused worker writes nothing more for them, since it is fenced until it
has beaten again and listed what is still its own: every request has exactly one final event, its events
numbered once each, and the resumed worker drops what it lost and goes on serving."""

from __future__ import annotations

import secrets
import signal
import subprocess

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client
from llamaq.protocol import Event, Keys, TokenEvent
from llamaq.worker.heartbeat import live_workers

from .conftest import (
    FAILOVER_TTL_S,
    enqueue_by_hand,
    hand_made_request,
    reply_events,
    scrape_samples,
    worker_metrics_port,
    worker_output,
    worker_process,
)

pytestmark = pytest.mark.slow

FLAGS = ("--threads", "1", "--heartbeat-ttl", str(FAILOVER_TTL_S))
MAX_TOKENS = 96


async def test_a_worker_paused_past_its_lease_writes_nothing_for_the_requests_it_lost(
    redis_url: str, redis: aioredis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    requests = [
        hand_made_request("fenced-client-01", secrets.token_hex(8), f"Count from {i} to 300:", MAX_TOKENS)
        for i in range(4)
    ]
    replies = [keys.reply(r.client_id, r.id) for r in requests]
    with worker_process(redis_url, prefix, *FLAGS) as first, worker_process(redis_url, prefix, *FLAGS) as second:
        with anyio.fail_after(30):
            while len(await live_workers(redis, keys)) < 2:
                await anyio.sleep(0.1)
        for request in requests:
            await enqueue_by_hand(redis, keys, request)
        with anyio.fail_after(60):
            while min([len(await reply_events(redis, reply)) for reply in replies]) < 3:
                await anyio.sleep(0.05)
        pending = {
            c["name"].decode(): int(c["pending"]) for c in await redis.xinfo_consumers(keys.requests, keys.group)
        }
        victim_name = max(pending, key=lambda name: pending[name])
        victim, other = (first, second) if f"-{first.pid}-" in victim_name else (second, first)
        victim.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(120):
                while not all([finished(await reply_events(redis, reply)) for reply in replies]):
                    await anyio.sleep(0.1)
        finally:
            victim.send_signal(signal.SIGCONT)
        with anyio.move_on_after(30):
            while counter(victim, "llamaq_requests_dropped_total", ("reason", "lease_lost")) < pending[victim_name]:
                await anyio.sleep(0.2)
        # Anything the resumed worker still wrote for its lost requests would be on the streams by now.
        await anyio.sleep(1.0)
        streams = [await reply_events(redis, reply) for reply in replies]
        for stream in streams:
            assert [e.n for e in stream] == list(range(len(stream))), [e.n for e in stream]
            assert sum(not isinstance(e, TokenEvent) for e in stream) == 1, stream[-3:]
            assert finished(stream)
        lost = counter(victim, "llamaq_requests_dropped_total", ("reason", "lease_lost"))
        assert lost == pending[victim_name], f"{lost} of {pending[victim_name]} dropped:\n{worker_output(victim)}"
        assert counter(victim, "llamaq_lease_lapses_total") >= 1
        other.kill()
        other.wait()
        async with Client.from_url(redis_url, prefix=prefix) as client:
            with anyio.fail_after(60):
                after = await client.completion("The capital of France is", max_tokens=8, temperature=0)
        assert victim.poll() is None, worker_output(victim)
    assert pending[victim_name] > 0, "the paused worker held requests"
    assert after.usage.completion_tokens == 8


def finished(events: list[Event]) -> bool:
    return any(not isinstance(e, TokenEvent) for e in events)


def counter(worker: subprocess.Popen[bytes], name: str, *labels: tuple[str, str]) -> float:
    return scrape_samples(worker_metrics_port(worker)).get((name, tuple(labels)), 0.0)
