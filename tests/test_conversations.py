"""Named conversations on the real model: history in Redis, KV kept between turns, append form, rewind, fork,
delete, and rebuilding after eviction. Greedy text is compared with a worker that caches nothing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode, owned_conversation, owner_of

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Tell me about lighthouses.",
    "Who keeps them?",
    "How tall are they?",
    "What powers the light?",
    "Are any still staffed?",
    "Which is the oldest?",
    "Can visitors climb them?",
    "What is a foghorn?",
    "How far can the light be seen?",
    "Thanks, one last fact?",
]


@contextlib.asynccontextmanager
async def reference(redis_url: str, model_path: Path) -> AsyncIterator[Client]:
    """A worker that reuses nothing, for greedy texts computed from scratch."""
    prefix = "reference"
    async with (
        running_worker(worker_settings(redis_url, model_path, prefix, prefix_cache=False)),
        Client.from_url(redis_url, prefix=prefix) as client,
    ):
        yield client


async def test_each_turn_computes_only_its_new_messages(redis_url: str, model_path: Path, prefix: str) -> None:
    """Turn cost counted by the engine: turn 10 of a conversation decodes about as much as turn 1, not its
    whole history; the history lives in Redis."""
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        loop = worker.engine_loop
        assert loop is not None
        computed = []
        async with Client.from_url(redis_url, prefix=prefix) as client:
            for question in QUESTIONS:
                before = loop.engine.tokens_decoded
                turn = await client.chat(
                    [{"role": "user", "content": question}],
                    conversation="lighthouse-chat",
                    append=True,
                    max_tokens=24,
                    temperature=0,
                )
                prompt_work = loop.engine.tokens_decoded - before - (turn.usage.completion_tokens - 1)
                computed.append((prompt_work, turn.usage.prompt_tokens, turn.usage.cached_tokens))
            stored = await client.get_conversation("lighthouse-chat")
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    first, last = computed[0], computed[-1]
    assert last[1] > 5 * first[1] // 2, "the history did not grow"
    assert last[0] < 2 * first[0], f"turn 10 computed {last[0]} prompt tokens against {first[0]} on turn 1"
    assert last[2] == last[1] - last[0]
    assert len(stored["messages"]) == 2 * len(QUESTIONS)
    assert [m["content"] for m in stored["messages"][::2]] == QUESTIONS


async def test_append_form_equals_sending_the_whole_history(redis_url: str, model_path: Path, prefix: str) -> None:
    async with (
        running_worker(worker_settings(redis_url, model_path, prefix)),
        Client.from_url(redis_url, prefix=prefix) as client,
    ):
        history: list[dict[str, str]] = []
        for question in QUESTIONS[:3]:
            appended = await client.chat(
                [{"role": "user", "content": question}],
                conversation="append-form",
                append=True,
                max_tokens=20,
                temperature=0,
            )
            history.append({"role": "user", "content": question})
            async with reference(redis_url, model_path) as fresh:
                whole = await fresh.chat(history, max_tokens=20, temperature=0)
            assert appended.text == whole.text
            history.append({"role": "assistant", "content": appended.text})


async def test_rewind_then_a_new_turn_equals_a_fresh_run_of_the_edited_history(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            for question in QUESTIONS[:2]:
                await client.chat(
                    [{"role": "user", "content": question}],
                    conversation="edited-chat",
                    append=True,
                    max_tokens=20,
                    temperature=0,
                )
            rewound = await client.rewind_conversation("edited-chat", to_message=2)
            assert len(rewound["messages"]) == 2
            edited = await client.chat(
                [{"role": "user", "content": "Who painted them?"}],
                conversation="edited-chat",
                append=True,
                max_tokens=20,
                temperature=0,
            )
            kept = rewound["messages"] + [{"role": "user", "content": "Who painted them?"}]
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    async with reference(redis_url, model_path) as fresh:
        expected = await fresh.chat(kept, max_tokens=20, temperature=0)
    assert edited.text == expected.text
    assert edited.usage.cached_tokens > 0, "the kept part of the history was computed again"


async def test_forked_branches_equal_independent_runs(redis_url: str, model_path: Path, prefix: str) -> None:
    async with (
        running_worker(worker_settings(redis_url, model_path, prefix)),
        Client.from_url(redis_url, prefix=prefix) as client,
    ):
        await client.chat(
            [{"role": "user", "content": QUESTIONS[0]}],
            conversation="trunk-chat",
            append=True,
            max_tokens=20,
            temperature=0,
        )
        branch = await client.fork_conversation("trunk-chat")
        a = await client.chat(
            [{"role": "user", "content": "Answer A?"}],
            conversation="trunk-chat",
            append=True,
            max_tokens=20,
            temperature=0,
        )
        b = await client.chat(
            [{"role": "user", "content": "Answer B?"}],
            conversation=branch,
            append=True,
            max_tokens=20,
            temperature=0,
        )
        trunk = (await client.get_conversation("trunk-chat"))["messages"]
        forked = (await client.get_conversation(branch))["messages"]
    assert trunk[:2] == forked[:2] and trunk[2:] != forked[2:]
    assert a.usage.cached_tokens > 0 and b.usage.cached_tokens > 0, "a branch did not reuse the trunk's KV"
    async with reference(redis_url, model_path) as fresh:
        expected_a = await fresh.chat(trunk[:3], max_tokens=20, temperature=0)
        expected_b = await fresh.chat(forked[:3], max_tokens=20, temperature=0)
    assert (a.text, b.text) == (expected_a.text, expected_b.text)


async def test_delete_forgets_the_history_and_the_cached_kv(redis_url: str, model_path: Path, prefix: str) -> None:
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        loop = worker.engine_loop
        assert loop is not None
        async with Client.from_url(redis_url, prefix=prefix) as client:
            await client.chat(
                [{"role": "user", "content": "Remember the word teapot."}],
                conversation="secret-chat",
                append=True,
                max_tokens=8,
                temperature=0,
            )
            await wait_until_idle(worker)
            held = owned_conversation(owner_of(None, client.client_id), "secret-chat")
            assert loop.kv.owned_by(held)
            await client.delete_conversation("secret-chat")
            with pytest.raises(RequestFailed) as caught:
                await client.get_conversation("secret-chat")
        await wait_until_idle(worker)
        assert not loop.kv.owned_by(held)
        assert_kv_cache_accounted(worker)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


async def test_an_evicted_conversation_is_rebuilt_from_its_history(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    settings = worker_settings(redis_url, model_path, prefix, parallel=2, n_ctx=2048)
    async with running_worker(settings), Client.from_url(redis_url, prefix=prefix) as client:
        first = await client.chat(
            [{"role": "user", "content": QUESTIONS[0]}],
            conversation="evicted-chat",
            append=True,
            max_tokens=16,
            temperature=0,
        )
        for word in ("Apples", "Bridges", "Comets"):  # distinct prompts push the conversation's KV out
            await client.completion(f"{word} are", max_tokens=4, temperature=0)
        second = await client.chat(
            [{"role": "user", "content": QUESTIONS[1]}],
            conversation="evicted-chat",
            append=True,
            max_tokens=16,
            temperature=0,
        )
    assert second.usage.cached_tokens == 0, "the conversation should have been evicted"
    history = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    async with reference(redis_url, model_path) as fresh:
        expected = await fresh.chat(history, max_tokens=16, temperature=0)
    assert second.text == expected.text


async def test_completion_conversation_appends_and_rewinds_by_tokens(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    async with (
        running_worker(worker_settings(redis_url, model_path, prefix)),
        Client.from_url(redis_url, prefix=prefix) as client,
    ):
        one = await client.completion(
            "The keeper's log, day one:", conversation="logbook-text", append=True, max_tokens=12, temperature=0
        )
        two = await client.completion(
            " Day two:", conversation="logbook-text", append=True, max_tokens=12, temperature=0
        )
        stored = await client.get_conversation("logbook-text")
        rewound = await client.rewind_conversation("logbook-text", drop_tokens=12)
        with pytest.raises(RequestFailed) as wrong:
            await client.rewind_conversation("logbook-text", to_message=1)
    assert stored["text"] == "The keeper's log, day one:" + one.text + " Day two:" + two.text
    assert two.usage.cached_tokens > 0
    assert stored["text"].startswith(rewound["text"]) and len(rewound["text"]) < len(stored["text"])
    assert wrong.value.code is ErrorCode.INVALID_REQUEST
