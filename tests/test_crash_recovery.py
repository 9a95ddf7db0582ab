"""A worker killed with SIGKILL mid-stream: live workers claim what it left pending once its heartbeat lapses,
and resume each request after the events already sent, so every stream completes exactly once with the greedy
text of an uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from llamaq.client import Client
from llamaq.protocol import DoneEvent, ErrorEvent, Event, Keys, TokenEvent
from llamaq.worker.heartbeat import live_workers

from .conftest import running_worker, worker_output, worker_process, worker_settings

pytestmark = pytest.mark.slow

THINGS = ["lighthouse", "river", "fox", "violin", "glacier", "teapot", "comet", "orchard", "harbour", "owl"]
MAX_TOKENS = 48
ONE_THREAD = ("--threads", "1")
"""Three workers on a two-core machine: more llama.cpp threads than cores spin against each other and slow every
worker many times over."""


def chat(thing: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short story about a {thing}."}]


async def reference_texts(redis_url: str, model_path: Path) -> list[str]:
    """Each prompt's greedy text on a worker nobody kills."""
    prefix = "crash-reference"
    async with (
        running_worker(worker_settings(redis_url, model_path, prefix)),
        Client.from_url(redis_url, prefix=prefix) as client,
    ):
        results = [await client.chat(chat(t), max_tokens=MAX_TOKENS, temperature=0) for t in THINGS]
    return [r.text for r in results]


async def test_streams_of_a_killed_worker_complete_exactly_once_with_the_uninterrupted_text(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    expected = await reference_texts(redis_url, model_path)
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url)
    with (
        worker_process(redis_url, prefix, *ONE_THREAD) as first,
        worker_process(redis_url, prefix, *ONE_THREAD) as second,
        worker_process(redis_url, prefix, *ONE_THREAD) as third,
    ):
        processes = {str(p.pid): p for p in (first, second, third)}
        with anyio.fail_after(30):
            while len(await live_workers(redis, keys)) < 3:
                await anyio.sleep(0.2)
        events: list[list[Event]] = [[] for _ in THINGS]
        async with Client.from_url(redis_url, prefix=prefix) as client:
            handles = [await client.submit(messages=chat(t), max_tokens=MAX_TOKENS, temperature=0) for t in THINGS]

            async def collect(index: int) -> None:
                async with handles[index] as handle:
                    async for event in handle:
                        events[index].append(event)

            async with anyio.create_task_group() as group:
                for index in range(len(THINGS)):
                    group.start_soon(collect, index)
                with anyio.fail_after(60):
                    while sum(len(e) for e in events) < 3 * len(THINGS):
                        await anyio.sleep(0.05)
                victim = await busiest_worker(redis, keys)
                killed = next(p for pid, p in processes.items() if f"-{pid}-" in victim)
                pending_on_victim = (await pending_by_consumer(redis, keys)).get(victim, 0)
                killed.send_signal(signal.SIGKILL)
                # Generous: a bound for a hang, not a speed target (a loaded machine is many times slower).
                with anyio.move_on_after(300):
                    while not all(e and not isinstance(e[-1], TokenEvent) for e in events):
                        await anyio.sleep(0.2)
                unfinished = [
                    (THINGS[i], len(e)) for i, e in enumerate(events) if not e or isinstance(e[-1], TokenEvent)
                ]
                if unfinished:
                    logs = "\n\n".join(f"worker {p.pid}:\n{worker_output(p)}" for p in (first, second, third))
                    pending = await pending_by_consumer(redis, keys)
                    pytest.fail(f"unfinished (prompt, events): {unfinished}; pending {pending}\n{logs}")
    await redis.aclose()
    assert pending_on_victim > 0, "the killed worker held requests"
    for index, stream in enumerate(events):
        assert not isinstance(stream[-1], ErrorEvent), stream[-1]
        assert [event.n for event in stream] == list(range(len(stream))), "every event once, in order"
        tokens = [t for event in stream if isinstance(event, TokenEvent) for t in event.tokens]
        done = stream[-1]
        assert isinstance(done, DoneEvent) and done.usage.completion_tokens == len(tokens)
        assert "".join(e.text for e in stream if isinstance(e, TokenEvent)) == expected[index], THINGS[index]


async def pending_by_consumer(redis: aioredis.Redis, keys: Keys) -> dict[str, int]:
    consumers = await redis.xinfo_consumers(keys.requests, keys.group)
    return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]: int(c["pending"]) for c in consumers}


async def busiest_worker(redis: aioredis.Redis, keys: Keys) -> str:
    """The consumer with the most requests pending (being served) right now."""
    pending = await pending_by_consumer(redis, keys)
    return max(pending, key=lambda name: pending[name])
