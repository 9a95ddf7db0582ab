"""A bounded backlog: beyond the depth the workers set, a new request gets `overloaded` at once, or waits for
room when its client asks to; requests already queued are served once a worker has room."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode

from .conftest import running_worker, worker_settings

pytestmark = pytest.mark.slow


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_a_full_backlog_answers_overloaded_at_once_and_waiting_clients_get_in(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    settings = worker_settings(redis_url, model_path, prefix, max_backlog=3)
    async with running_worker(settings):
        pass  # the worker states the bound in Redis; with it gone, queued requests stay in the stream
    async with Client.from_url(redis_url, prefix=prefix) as client:
        queued = [await client.submit(messages=chat(f"Say {i}."), max_tokens=4, temperature=0) for i in range(3)]
        started = time.monotonic()
        with pytest.raises(RequestFailed) as refused:
            await client.submit(messages=chat("One too many."), max_tokens=4)
        assert refused.value.code is ErrorCode.OVERLOADED and time.monotonic() - started < 1.0
        with pytest.raises(RequestFailed) as gave_up:
            await client.submit(messages=chat("Waits a second."), max_tokens=4, wait_if_overloaded=True, deadline_s=1)
        assert gave_up.value.code is ErrorCode.OVERLOADED

        results = []

        async def patient() -> None:
            handle = await client.submit(messages=chat("Patient."), max_tokens=4, wait_if_overloaded=True)
            async with handle:
                results.append(await handle.result())

        async with anyio.create_task_group() as group:
            group.start_soon(patient)
            await anyio.sleep(0.5)
            assert not results, "still waiting for room"
            async with running_worker(settings):
                for handle in queued:
                    async with handle:
                        results.append(await handle.result())
                with anyio.fail_after(60):
                    while len(results) < 4:
                        await anyio.sleep(0.1)
    assert all(r.usage.completion_tokens > 0 for r in results)
