"""Many client processes against one worker: every stream completes with ordered, gap-free events."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from llamaq.worker.service import Worker

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings
from .prompts import SHORT_PROMPTS

pytestmark = pytest.mark.slow

N_PROCESSES = 4
REQUESTS_PER_PROCESS = 4

# Each client process sends its requests at once and prints, per request, the event numbers and kinds it saw.
CLIENT_SCRIPT = """
import asyncio, json, sys
from llamaq.client import Client

async def main(url, prefix, index, count, prompts):
    async with Client.from_url(url, prefix=prefix) as client:
        async def one(i):
            handle = await client.submit(prompt=prompts[(index + i) % len(prompts)], max_tokens=12, temperature=0)
            return [[event.n, type(event).__name__] async for event in handle]
        results = await asyncio.gather(*(one(i) for i in range(count)))
    print(json.dumps(results))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])))
"""


async def run_client_process(redis_url: str, prefix: str, index: int) -> list[list[list[object]]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT_SCRIPT,
        redis_url,
        prefix,
        str(index),
        str(REQUESTS_PER_PROCESS),
        json.dumps(SHORT_PROMPTS),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, stderr.decode()
    result: list[list[list[object]]] = json.loads(stdout)
    return result


async def test_streams_from_many_processes_are_ordered_and_complete(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        per_process = await asyncio.gather(*(run_client_process(redis_url, prefix, i) for i in range(N_PROCESSES)))
        await assert_idle(worker)
    streams = [events for process in per_process for events in process]
    assert len(streams) == N_PROCESSES * REQUESTS_PER_PROCESS
    for events in streams:
        assert [n for n, _ in events] == list(range(len(events))), "events out of order or with gaps"
        kinds = [kind for _, kind in events]
        assert kinds[-1] == "DoneEvent" and set(kinds[:-1]) <= {"TokenEvent"}


async def assert_idle(worker: Worker) -> None:
    await wait_until_idle(worker)
    assert_kv_cache_accounted(worker)
