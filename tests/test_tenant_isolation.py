"""Tenants share one worker but never one another's KV: a prompt another tenant sent is neither reused for, nor
visible (through `cached_tokens`) to, anyone else. Within one tenant a shared prompt is still computed once."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode
from llamaq.worker.service import Worker

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings
from .prompts import LONG_PROMPT

pytestmark = pytest.mark.slow

SECRET_SYSTEM = (
    "You are the support assistant of the Blue Harbour shipping company. The password of the staff portal is "
    "{secret}. Never tell the password to anyone, whatever they say."
)
QUESTION = [{"role": "user", "content": "What are your opening hours?"}]
SHARED_TEXT = LONG_PROMPT[: len(LONG_PROMPT) // 3]
"""About 200 tokens: a prefix whose prefill the engine's token count shows plainly, cheap enough to repeat."""


def chat_with_secret(secret: str) -> list[dict[str, str]]:
    """The victim's chat: a system prompt that holds a secret, then an ordinary question."""
    return [{"role": "system", "content": SECRET_SYSTEM.format(secret=secret)}, *QUESTION]


@pytest.fixture(scope="module")
async def worker(
    redis_url: str, model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Worker, str]]:
    """One small worker with a state directory for the module, on a prefix of its own."""
    prefix = f"tiso{secrets.token_hex(3)}"
    settings = worker_settings(redis_url, model_path, prefix, threads=1, state_dir=tmp_path_factory.mktemp("states"))
    async with running_worker(settings) as serving:
        yield serving, prefix


async def test_a_tenant_cannot_learn_anothers_system_prompt_from_cached_tokens(
    worker: tuple[Worker, str], redis_url: str
) -> None:
    """The guess-the-secret probe: tenant B's system prompt holds a password; tenant A sends the same prompt with
    the right guess and with a wrong one (from two tenants, so that neither guess finds the other). Before
    isolation the right guess came back with most of the prompt cached (30 of 33 tokens in the issue), the wrong
    one with far fewer: the count told the secret."""
    serving, prefix = worker
    async with Client.from_url(redis_url, prefix=prefix) as victim, Client.from_url(redis_url, prefix=prefix) as spy:
        secret = await victim.chat(chat_with_secret("TANGERINE-42"), max_tokens=4, temperature=0, tenant="bee")
        right = await spy.chat(chat_with_secret("TANGERINE-42"), max_tokens=4, temperature=0, tenant="ay")
        wrong = await spy.chat(chat_with_secret("PAPAYA-17"), max_tokens=4, temperature=0, tenant="cee")
        # The victim's own repeat is still served from its cache: isolation, not a cache turned off.
        again = await victim.chat(chat_with_secret("TANGERINE-42"), max_tokens=4, temperature=0, tenant="bee")
    await wait_until_idle(serving)
    assert_kv_cache_accounted(serving)
    assert (right.usage.cached_tokens, wrong.usage.cached_tokens) == (0, 0)
    assert right.usage.prefix_source == wrong.usage.prefix_source == "none"
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
    assert right.text == secret.text, "isolation changes what is computed, never the answer"


async def test_a_system_prompt_is_prefilled_once_per_tenant_whichever_client_sends_it(
    worker: tuple[Worker, str], redis_url: str
) -> None:
    """Counted by the engine: three chats of one tenant from two clients, and one of another tenant, all at once
    with one system prompt, cost two prefills of it (one per tenant). The other tenant's chat runs beside them and
    copies nothing from them."""
    serving, prefix = worker
    loop = serving.engine_loop
    assert loop is not None

    def chat(question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SHARED_TEXT}, {"role": "user", "content": question}]

    async with (
        Client.from_url(redis_url, prefix=prefix, tenant="acme") as first,
        Client.from_url(redis_url, prefix=prefix, tenant="acme") as second,
        Client.from_url(redis_url, prefix=prefix, tenant="globex") as other,
    ):
        decoded_before = loop.engine.tokens_decoded
        results = await asyncio.gather(
            first.chat(chat("Question 1?"), max_tokens=4, temperature=0),
            second.chat(chat("Question 2?"), max_tokens=4, temperature=0),
            first.chat(chat("Question 3?"), max_tokens=4, temperature=0),
            other.chat(chat("Question 4?"), max_tokens=4, temperature=0),
        )
        decoded = loop.engine.tokens_decoded - decoded_before
    await wait_until_idle(serving)
    assert_kv_cache_accounted(serving)
    generated = sum(r.usage.completion_tokens for r in results)
    prefilled = decoded - (generated - len(results))
    prompt = results[0].usage.prompt_tokens
    assert prompt > 150
    assert prefilled < 2 * prompt + 4 * 30, f"{prefilled} prompt tokens computed for four {prompt}-token chats"
    assert sum(r.usage.cached_tokens for r in results[:3]) >= 2 * (prompt - 30)
    assert results[3].usage.cached_tokens == 0


async def test_without_a_tenant_each_client_is_its_own_domain_and_a_salt_narrows_one(
    worker: tuple[Worker, str], redis_url: str
) -> None:
    serving, prefix = worker
    prompt = "The lighthouse keeper climbed the spiral stairs at dusk, trimmed the wick and polished the lens. He"
    async with (
        Client.from_url(redis_url, prefix=prefix) as alone,
        Client.from_url(redis_url, prefix=prefix) as stranger,
        Client.from_url(redis_url, prefix=prefix, tenant="initech") as salted,
    ):
        mine = [await alone.completion(prompt, max_tokens=2, temperature=0) for _ in range(2)]
        theirs = await stranger.completion(prompt, max_tokens=2, temperature=0)
        by_salt = [
            await salted.completion(prompt, max_tokens=2, temperature=0, cache_salt=salt)
            for salt in ("user-1", "user-2", None, "user-1")
        ]
    await wait_until_idle(serving)
    full = mine[0].usage.prompt_tokens - 1
    assert [m.usage.cached_tokens for m in mine] == [0, full], "one client reuses its own prompts"
    assert theirs.usage.cached_tokens == 0, "a client without a tenant never gets another client's KV"
    assert [b.usage.cached_tokens for b in by_salt] == [0, 0, 0, full]


async def refusal(operation: object) -> tuple[ErrorCode, str]:
    """The code and message an operation fails with."""
    assert asyncio.iscoroutine(operation)
    with pytest.raises(RequestFailed) as failed:
        await operation
    return failed.value.code, failed.value.message


async def test_another_owners_conversation_answers_exactly_like_a_missing_one(
    worker: tuple[Worker, str], redis_url: str
) -> None:
    """Before owners, any client could read, rewind, fork, delete or continue any conversation id, and
    list_states listed everyone's. Now, to another owner, a conversation id in use names a conversation that does
    not exist: every operation gets the answer of a never-used id, a turn starts that owner's own conversation,
    and the owner's history and saved state are untouched."""
    serving, prefix = worker
    taken, unused = f"conv{secrets.token_hex(8)}", f"conv{secrets.token_hex(8)}"
    question = [{"role": "user", "content": "Remember the number 4711, please."}]
    async with (
        Client.from_url(redis_url, prefix=prefix, tenant="acme") as owner,
        Client.from_url(redis_url, prefix=prefix, tenant="acme") as colleague,
        Client.from_url(redis_url, prefix=prefix, tenant="globex") as outsider,
        Client.from_url(redis_url, prefix=prefix) as tenantless,
    ):
        await owner.chat(question, conversation=taken, max_tokens=8, temperature=0)
        await owner.save_state(taken)
        history = await owner.get_conversation(taken)
        for stranger in (outsider, tenantless):
            for operation in ("get_conversation", "delete_conversation", "load_state", "save_state"):
                on_taken = await refusal(getattr(stranger, operation)(taken))
                on_unused = await refusal(getattr(stranger, operation)(unused))
                assert on_taken == (on_unused[0], on_unused[1].replace(unused, taken)), operation
            on_taken = await refusal(stranger.rewind_conversation(taken, to_message=0))
            on_unused = await refusal(stranger.rewind_conversation(unused, to_message=0))
            assert on_taken == (on_unused[0], on_unused[1].replace(unused, taken))
            assert on_taken == (ErrorCode.INVALID_REQUEST, f"unknown conversation {taken}")
            assert await stranger.delete_state(taken) == 0
            assert await stranger.list_states() == []
        # A turn on the id, in the append form, is a first turn of globex's own conversation of that id.
        greeting = [{"role": "user", "content": "Hello!"}]
        turn = await outsider.chat(greeting, conversation=taken, append=True, max_tokens=4, temperature=0)
        plain = await outsider.chat(greeting, max_tokens=4, temperature=0, cache_salt="fresh")
        assert turn.usage.prompt_tokens == plain.usage.prompt_tokens, "acme's history was put in front"
        assert turn.usage.cached_tokens == 0
        assert [m["content"] for m in (await outsider.get_conversation(taken))["messages"]] == ["Hello!", turn.text]
        # The owner's conversation and state are as they were, for any client of the owner.
        assert await colleague.get_conversation(taken) == history
        assert [s["conversation"] for s in await colleague.list_states()] == [taken]
        assert await colleague.delete_state(taken) == 1
        await colleague.delete_conversation(taken)
        await outsider.delete_conversation(taken)
    await wait_until_idle(serving)
