"""Conversations that outlive their KV cache and their worker: swapped to disk on eviction, saved at shutdown,
restored (verified) on the next turn, with greedy text equal to a worker that never lost anything."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode

from .conftest import (
    assert_kv_cache_accounted,
    running_worker,
    wait_until_idle,
    worker_process,
    worker_settings,
)

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are the keeper of an old lighthouse on a rocky island. You answer questions about the light, the sea, "
    "the weather and the ships that pass, briefly and kindly. "
) * 4
QUESTIONS = ["What do you do at dusk?", "And when the fog comes in?"]
TENANT = "lighthouse"
"""The owner of the conversations that outlive one client (its id changes across a restart)."""


def turn_messages(conversation_replies: list[str], upto: int, island: str = "Skerry") -> list[dict[str, str]]:
    """The whole history a chat client sends for turn `upto` (0-based); each island its own system prompt."""
    messages = [{"role": "system", "content": f"{island} island. {SYSTEM}"}]
    for index in range(upto + 1):
        messages.append({"role": "user", "content": f"{QUESTIONS[index]}"})
        if index < upto:
            messages.append({"role": "assistant", "content": conversation_replies[index]})
    return messages


async def reference_turns(client: Client, conversation: str, island: str = "Skerry") -> list[str]:
    """Both turns of a conversation on one worker, uninterrupted."""
    replies: list[str] = []
    for turn in range(2):
        messages = turn_messages(replies, turn, island)
        done = await client.chat(messages, conversation=conversation, max_tokens=24, temperature=0)
        replies.append(done.text)
    return replies


@contextlib.asynccontextmanager
async def reference_client(redis_url: str, model_path: Path) -> AsyncIterator[Client]:
    """A worker that caches nothing: the uninterrupted greedy texts."""
    async with (
        running_worker(worker_settings(redis_url, model_path, "durable-reference", prefix_cache=False)),
        Client.from_url(redis_url, prefix="durable-reference") as client,
    ):
        yield client


async def test_an_evicted_conversation_is_swapped_to_disk_and_restored_verified(
    redis_url: str, model_path: Path, prefix: str, tmp_path: Path
) -> None:
    """Round trip: save on eviction, restore on the next turn (reported as disk, restored tokens cached), the
    same greedy text as an uninterrupted run."""
    settings = worker_settings(redis_url, model_path, prefix, parallel=2, state_dir=tmp_path, swap_min_tokens=16)
    async with running_worker(settings) as worker, Client.from_url(redis_url, prefix=prefix) as client:
        first = await client.chat(turn_messages([], 0), conversation="keeper-chat", max_tokens=24, temperature=0)
        # Two other conversations at once need both sequence ids: the keeper's idle KV is evicted to disk.
        async with anyio.create_task_group() as group:
            for name in ("other-chat-1", "other-chat-2"):
                hello = [{"role": "user", "content": f"{name} says hello"}]
                group.start_soon(lambda h=hello, n=name: client.chat(h, conversation=n, max_tokens=8))
        states = await client.list_states()
        assert any(s["conversation"] == "keeper-chat" and s["kind"] == "swap" for s in states)
        second = await client.chat(
            turn_messages([first.text], 1), conversation="keeper-chat", max_tokens=24, temperature=0
        )
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
        loop = worker.engine_loop
        assert loop is not None and loop.state is not None
        assert loop.state.swap.swaps_out >= 1 and loop.state.swap.swaps_in == 1
        assert loop.state.swap.check_failures == 0
    assert second.usage.prefix_source == "disk"
    assert second.usage.restored_tokens == second.usage.cached_tokens > 100
    assert second.timings.restore_ms > 0
    async with reference_client(redis_url, model_path) as reference:
        assert [first.text, second.text] == await reference_turns(reference, "keeper-chat")


async def test_a_restarted_worker_resumes_conversations_from_disk_or_from_history(
    redis_url: str, model_path: Path, prefix: str, tmp_path: Path
) -> None:
    """Shutdown saves every conversation in KV. After a restart: an intact file is restored (cached tokens
    reported), a missing file or a corrupt one falls back to the history in Redis; all three continue with the
    uninterrupted greedy text."""
    names = ["resume-intact", "resume-missing", "resume-corrupt"]
    islands = dict(zip(names, ["Fair", "Mull", "Eigg"], strict=True))
    settings = worker_settings(redis_url, model_path, prefix, state_dir=tmp_path, swap_min_tokens=16)
    firsts = {}
    # One tenant owns the conversations, so the clients before and after the restart (other client ids) share them.
    async with running_worker(settings), Client.from_url(redis_url, prefix=prefix, tenant=TENANT) as client:
        for name in names:
            messages = turn_messages([], 0, islands[name])
            done = await client.chat(messages, conversation=name, max_tokens=24, temperature=0)
            firsts[name] = done.text
    files = {path.name.split(".")[0]: path for path in (tmp_path / f"t.{TENANT}").glob("*.llqs")}
    assert set(files) == set(names), "shutdown saved each conversation held in KV"
    files["resume-missing"].unlink()
    data = bytearray(files["resume-corrupt"].read_bytes())
    data[len(data) // 3] ^= 0xFF
    files["resume-corrupt"].write_bytes(bytes(data))

    seconds = {}
    async with (
        running_worker(settings) as worker,
        Client.from_url(redis_url, prefix=prefix, tenant=TENANT) as client,
    ):
        for name in names:
            messages = turn_messages([firsts[name]], 1, islands[name])
            seconds[name] = await client.chat(messages, conversation=name, max_tokens=24, temperature=0)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
        loop = worker.engine_loop
        assert loop is not None and loop.state is not None
        assert dict(loop.state.swap.refusals) == {"corrupt": 1}
    assert seconds["resume-intact"].usage.prefix_source == "disk"
    assert seconds["resume-intact"].usage.cached_tokens == seconds["resume-intact"].usage.restored_tokens > 100
    assert seconds["resume-missing"].usage.prefix_source == "none"
    assert seconds["resume-corrupt"].usage.prefix_source == "recompute"
    assert seconds["resume-corrupt"].usage.cached_tokens == 0
    async with reference_client(redis_url, model_path) as reference:
        for name in names:
            expected = await reference_turns(reference, f"{name}-reference", islands[name])
            assert [firsts[name], seconds[name].text] == expected, name


async def test_saved_states_are_listed_loaded_by_another_worker_process_and_deleted(
    redis_url: str, model_path: Path, prefix: str, tmp_path: Path
) -> None:
    """The explicit operations: save a conversation's state in one worker, load it in another process that runs
    the same model, continue there from the loaded KV, then delete the state."""
    settings = worker_settings(redis_url, model_path, prefix, state_dir=tmp_path)
    async with running_worker(settings), Client.from_url(redis_url, prefix=prefix, tenant=TENANT) as client:
        first = await client.chat(turn_messages([], 0), conversation="saved-chat", max_tokens=24, temperature=0)
        saved = await client.save_state("saved-chat")
        assert saved["kind"] == "saved" and saved["n_tokens"] > 100
        with pytest.raises(RequestFailed) as unknown:
            await client.save_state("never-talked")
        assert unknown.value.code is ErrorCode.INVALID_REQUEST
    # Graceful shutdown found it saved as it is in KV, so it wrote no swap file besides.
    with worker_process(redis_url, prefix, "--state-dir", str(tmp_path)):
        async with Client.from_url(redis_url, prefix=prefix, tenant=TENANT) as client:
            states = await client.list_states()
            assert {(s["conversation"], s["kind"]) for s in states} == {("saved-chat", "saved")}
            loaded = await client.load_state("saved-chat")
            assert loaded["loaded"] and loaded["n_tokens"] == saved["n_tokens"]
            second = await client.chat(
                turn_messages([first.text], 1), conversation="saved-chat", max_tokens=24, temperature=0
            )
            assert second.usage.cached_tokens >= saved["n_tokens"] - 1
            assert await client.delete_state("saved-chat") == 1
            assert await client.list_states() == []
    async with reference_client(redis_url, model_path) as reference:
        assert [first.text, second.text] == await reference_turns(reference, "saved-reference")


async def test_state_operations_need_a_state_directory(redis_url: str, model_path: Path, prefix: str) -> None:
    async with (
        running_worker(worker_settings(redis_url, model_path, prefix)),
        Client.from_url(redis_url, prefix=prefix) as client,
    ):
        with pytest.raises(RequestFailed) as refused:
            await client.list_states()
        assert refused.value.code is ErrorCode.INVALID_REQUEST and "--state-dir" in str(refused.value)
