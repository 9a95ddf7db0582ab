"""A state directory (--state-dir) that breaks under a running worker (a volume gone, a path replaced): every
operation on it fails alone and is counted. A turn whose KV was swapped out is recomputed from its history, an
explicit state operation gets an `internal` error, everyone else is served, and the worker stops cleanly."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode, owner_of

from .conftest import running_worker, scrape_samples, worker_settings

pytestmark = pytest.mark.slow


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


SYSTEM = {"role": "system", "content": "You are a lighthouse keeper; answer in one sentence. " * 6}


async def test_a_broken_state_dir_fails_each_operation_alone_and_the_worker_goes_on(
    redis_url: str, model_path: Path, prefix: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    settings = worker_settings(redis_url, model_path, prefix, parallel=2, state_dir=state_dir, swap_min_tokens=16)
    async with running_worker(settings) as worker, Client.from_url(redis_url, prefix=prefix) as client:
        first = await client.chat([SYSTEM, *chat("Who are you?")], conversation="keeper-chat", max_tokens=8)
        # Two other conversations need both sequence ids: the keeper's idle KV is swapped out to the directory.
        async with anyio.create_task_group() as group:
            for name in ("evictor-one", "evictor-two"):
                group.start_soon(lambda n=name: client.chat(chat(n), conversation=n, max_tokens=4))
        owner = owner_of(None, client.client_id)  # the folder of the client's own state files
        assert (state_dir / owner / "keeper-chat.swap.llqs").exists()
        # The directory goes away and a plain file takes its path: every open under it fails (NotADirectoryError).
        state_dir.rename(tmp_path / "state-gone")
        state_dir.write_bytes(b"not a directory")
        history = [SYSTEM, *chat("Who are you?"), {"role": "assistant", "content": first.text}]
        second = await client.chat([*history, *chat("And then?")], conversation="keeper-chat", max_tokens=8)
        with pytest.raises(RequestFailed) as saving:
            await client.save_state("keeper-chat")
        with pytest.raises(RequestFailed) as deleting:
            await client.delete_state("keeper-chat")
        after = await client.completion("The capital of France is", max_tokens=8, temperature=0)
        loop = worker.engine_loop
        assert loop is not None and loop.alive
        assert worker.health_port is not None
        samples = await anyio.to_thread.run_sync(scrape_samples, worker.health_port)
    assert second.usage.completion_tokens > 0 and second.usage.prefix_source != "disk"
    assert saving.value.code is ErrorCode.INTERNAL and deleting.value.code is ErrorCode.INTERNAL
    assert "state directory" in str(saving.value)
    assert after.usage.completion_tokens == 8
    errors = {labels: v for (name, labels), v in samples.items() if name == "llamaq_state_dir_errors_total"}
    assert errors[(("operation", "restore"),)] >= 1, errors
    assert errors[(("operation", "save"),)] >= 1 and errors[(("operation", "delete"),)] >= 1, errors
