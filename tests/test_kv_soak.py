"""Soak: far more conversation tokens than the KV cache holds, with random lengths, edits, forks and
cancels, through Redis, in both layouts. Every request ends well or with a legitimate error, no decode error reaches a
client, and at the end llama.cpp holds exactly the cells the manager says it holds."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from llamaq.client import Client, RequestFailed, RequestHandle
from llamaq.protocol import DoneEvent, ErrorCode, ErrorEvent

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings

pytestmark = pytest.mark.slow

N_CTX = 1024
TASKS = 6
ACTIONS_PER_TASK = 30
WORDS = [
    "the",
    "keeper",
    "lamp",
    "ship",
    "storm",
    "tide",
    "rock",
    "gull",
    "rope",
    "bell",
    "harbour",
    "night",
    "fog",
    "light",
    "stair",
    "log",
]
LEGITIMATE = {ErrorCode.CONTEXT_LENGTH_EXCEEDED}


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


class Tally:
    """What the soak saw, by outcome."""

    def __init__(self) -> None:
        self.tokens = 0
        self.outcomes: dict[str, int] = {}
        self.unexpected: list[str] = []

    def done(self, event: DoneEvent) -> None:
        self.tokens += event.usage.prompt_tokens + event.usage.completion_tokens
        self.count(f"done:{event.finish_reason.value}")

    def failed(self, code: ErrorCode, message: str) -> None:
        self.count(f"error:{code.value}")
        if code not in LEGITIMATE:
            self.unexpected.append(f"{code.value}: {message}")

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def one_task(client: Client, task: int, rng: random.Random, tally: Tally) -> None:
    conversation = f"soak-{task}-{rng.randrange(10**6):06d}"
    actions = [chat_turn, stateless, cancelled, rewind, fork, delete]
    for _ in range(ACTIONS_PER_TASK):
        action = rng.choices(actions, [6, 3, 2, 1, 1, 1])[0]
        try:
            conversation = await action(client, conversation, rng, tally)
        except RequestFailed as exc:
            # An op on a conversation that does not exist yet, or was deleted: a legitimate refusal.
            if exc.code is ErrorCode.INVALID_REQUEST and "unknown conversation" in exc.message:
                tally.count("op:unknown")
            else:
                tally.failed(exc.code, exc.message)


async def chat_turn(client: Client, conversation: str, rng: random.Random, tally: Tally) -> str:
    handle = await client.submit(
        messages=[{"role": "user", "content": sentence(rng, rng.randint(5, 80))}],
        conversation=conversation,
        append=True,
        max_tokens=rng.randint(4, 48),
        temperature=rng.choice([0.0, 0.8]),
        seed=rng.randrange(1000),
    )
    if not await settle(handle, tally):
        # The conversation outgrew its window: edit it down, as a chat front end would.
        await client.rewind_conversation(conversation, to_message=2)
        tally.count("op:rewind")
    return conversation


async def stateless(client: Client, conversation: str, rng: random.Random, tally: Tally) -> str:
    shared = "The lighthouse log for the winter season. " * rng.randint(1, 20)
    handle = await client.submit(prompt=shared + sentence(rng, 8), max_tokens=rng.randint(4, 48), temperature=0)
    await settle(handle, tally)
    return conversation


async def cancelled(client: Client, conversation: str, rng: random.Random, tally: Tally) -> str:
    handle = await client.submit(prompt=sentence(rng, 40), max_tokens=200, temperature=0.8)
    async for event in handle:
        if event.n == 1:
            await handle.cancel()
        if isinstance(event, DoneEvent):
            tally.done(event)
        elif isinstance(event, ErrorEvent):
            tally.failed(event.code, event.message)
    return conversation


async def rewind(client: Client, conversation: str, rng: random.Random, tally: Tally) -> str:
    stored = await client.get_conversation(conversation)
    await client.rewind_conversation(conversation, to_message=len(stored["messages"]) // 2)
    tally.count("op:rewind")
    return conversation


async def fork(client: Client, conversation: str, rng: random.Random, tally: Tally) -> str:
    branch = await client.fork_conversation(conversation)
    tally.count("op:fork")
    return branch


async def delete(client: Client, conversation: str, rng: random.Random, tally: Tally) -> str:
    await client.delete_conversation(conversation)
    tally.count("op:delete")
    return conversation


async def settle(handle: RequestHandle, tally: Tally) -> bool:
    """Read a request to its end; False when it did not fit its window."""
    async for event in handle:
        if isinstance(event, DoneEvent):
            tally.done(event)
        elif isinstance(event, ErrorEvent):
            tally.failed(event.code, event.message)
            return event.code is not ErrorCode.CONTEXT_LENGTH_EXCEEDED
    return True


@pytest.mark.parametrize("unified", [False, True], ids=["per-sequence", "unified"])
async def test_soak_never_fails_on_kv_and_leaks_no_cells(
    redis_url: str, model_path: Path, prefix: str, unified: bool
) -> None:
    settings = worker_settings(redis_url, model_path, prefix, n_ctx=N_CTX, parallel=4, kv_unified=unified)
    tally = Tally()
    async with running_worker(settings) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client, anyio.create_task_group() as group:
            for task in range(TASKS):
                group.start_soon(one_task, client, task, random.Random(task * 7919 + int(unified)), tally)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
        loop = worker.engine_loop
        assert loop is not None and loop.decode_retries == 0
    print(f"soak ({'unified' if unified else 'per-sequence'}): {tally.tokens} tokens, {tally.outcomes}")
    assert not tally.unexpected, tally.unexpected
    assert tally.tokens >= 10 * N_CTX, f"only {tally.tokens} conversation tokens driven"
    assert tally.outcomes.get("done:cancelled", 0) > 0 and tally.outcomes.get("op:fork", 0) > 0
