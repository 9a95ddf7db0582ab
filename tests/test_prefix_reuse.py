"""Prefix reuse on the real model: a request that starts like an earlier one computes only the rest,
reports the reused tokens as cached, and its greedy text is the same as without the cache."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import anyio
import llama_cpp
import pytest

from llamaq.client import Client
from llamaq.protocol import ChatMessage, DoneEvent, Event, Request, RequestKind, SamplingParams, TokenEvent
from llamaq.worker.engine import Engine, EngineConfig
from llamaq.worker.engine_loop import EngineLoop, Outgoing, StepStats

from .conftest import assert_kv_cache_accounted, kv_cells_in_use, running_worker, wait_until_idle, worker_settings
from .greedy_reference import MAX_TOKENS, solo_llama_texts
from .prompts import LONG_PROMPT

pytestmark = pytest.mark.slow


async def test_same_prompt_again_is_served_from_cache(redis_url: str, model_path: Path, prefix: str) -> None:
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            first = await client.completion(LONG_PROMPT, max_tokens=16, temperature=0)
            again = await client.completion(LONG_PROMPT, max_tokens=16, temperature=0)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    assert first.usage.cached_tokens == 0
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
    assert again.text == first.text


async def test_extended_prompt_reuses_the_prefix_and_equals_a_solo_run(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    """Only the new tail is computed, on top of KV computed for another request, and the greedy text is still
    exactly that of the whole prompt run alone through llama-cpp-python's `Llama`."""
    extended = LONG_PROMPT + " a ship with red sails. The keeper wrote in his logbook that"
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            base = await client.completion(LONG_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            longer = await client.completion(extended, max_tokens=MAX_TOKENS, temperature=0)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    assert longer.usage.cached_tokens >= base.usage.prompt_tokens - 1
    assert longer.usage.prompt_tokens - longer.usage.cached_tokens < 30, "more than the new tail was computed"
    if not llama_cpp.llama_supports_gpu_offload():
        [solo] = await anyio.to_thread.run_sync(solo_llama_texts, model_path, [extended], llama_cpp.GGML_TYPE_Q8_0)
        assert longer.text == solo


async def test_next_chat_turn_computes_only_the_new_messages(redis_url: str, model_path: Path, prefix: str) -> None:
    history = [{"role": "user", "content": "Name a famous lighthouse."}]
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            turn1 = await client.chat(history, max_tokens=32, temperature=0)
            history += [
                {"role": "assistant", "content": turn1.text},
                {"role": "user", "content": "Where is it?"},
            ]
            turn2 = await client.chat(history, max_tokens=32, temperature=0)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    # The whole first turn (its prompt and the reply) comes from the cache; the template's end-of-turn marker
    # and the new message are what gets computed.
    assert turn2.usage.cached_tokens >= turn1.usage.prompt_tokens + turn1.usage.completion_tokens - 1
    assert turn2.usage.prompt_tokens - turn2.usage.cached_tokens < 20


async def test_idle_sequences_are_evicted_least_recently_used(redis_url: str, model_path: Path, prefix: str) -> None:
    settings = worker_settings(redis_url, model_path, prefix, parallel=2, n_ctx=2048)
    # Different first words: no prompt can reuse another's sequence, so each needs an id of its own.
    prompts = ["Apples grow on", "Bicycles have two", "Clouds are made of", "Dolphins live in"]
    async with running_worker(settings) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            results = [await client.completion(p, max_tokens=8, temperature=0) for p in prompts]
            newest_again = await client.completion(prompts[-1], max_tokens=8, temperature=0)
            oldest_again = await client.completion(prompts[0], max_tokens=8, temperature=0)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
        loop = worker.engine_loop
        assert loop is not None and loop.kv.n_idle == 2
    assert all(r.usage.completion_tokens == 8 for r in results)
    assert newest_again.usage.cached_tokens > 0, "the most recent sequence should still be cached"
    assert oldest_again.usage.cached_tokens == 0, "the least recently used sequence should have been evicted"
    assert (newest_again.text, oldest_again.text) == (results[-1].text, results[0].text)


async def test_with_the_prefix_cache_off_the_cache_ends_empty(redis_url: str, model_path: Path, prefix: str) -> None:
    async with running_worker(worker_settings(redis_url, model_path, prefix, prefix_cache=False)) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            first = await client.completion(LONG_PROMPT, max_tokens=8, temperature=0)
            again = await client.completion(LONG_PROMPT, max_tokens=8, temperature=0)
        await wait_until_idle(worker)
        assert kv_cells_in_use(worker) == 0
    assert again.usage.cached_tokens == 0 and again.text == first.text


@pytest.mark.parametrize("unified", [False, True], ids=["per-sequence", "unified"])
async def test_a_running_sequences_prefix_is_copied_into_a_new_request(
    redis_url: str, model_path: Path, prefix: str, unified: bool
) -> None:
    """Two requests share a long system text; the second arrives while the first is decoding and gets the
    shared part by llama_memory_seq_cp instead of computing it."""
    first_prompt = LONG_PROMPT + " a ship with red sails, and"
    second_prompt = LONG_PROMPT + " a whale in the bay, and"
    settings = worker_settings(redis_url, model_path, prefix, kv_unified=unified)
    async with running_worker(settings) as worker:
        async with Client.from_url(redis_url, prefix=prefix) as client:
            first = await client.submit(prompt=first_prompt, max_tokens=MAX_TOKENS, temperature=0)
            events = aiter(first)
            opening = await anext(events)  # the first has computed its prompt: its KV holds the shared part
            assert isinstance(opening, TokenEvent)
            second = await client.completion(second_prompt, max_tokens=MAX_TOKENS, temperature=0)
            first_done = await first.result()
            first_text = opening.text + first_done.text
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    # Everything but the few tokens after the shared text comes from the copy.
    assert second.usage.cached_tokens >= first_done.usage.prompt_tokens - 12
    if not unified and not llama_cpp.llama_supports_gpu_offload():
        solo = await anyio.to_thread.run_sync(
            solo_llama_texts, model_path, [first_prompt, second_prompt], llama_cpp.GGML_TYPE_Q8_0
        )
        assert [first_text, second.text] == solo


@pytest.mark.parametrize("unified", [False, True], ids=["per-sequence", "unified"])
async def test_a_system_prompt_shared_by_simultaneous_chats_is_prefilled_once(
    redis_url: str, model_path: Path, prefix: str, unified: bool
) -> None:
    """Counted by the engine, not timed: four chats sent at once with a ~600-token system prompt cost one
    prefill of it plus their own short suffixes."""
    settings = worker_settings(redis_url, model_path, prefix, kv_unified=unified)
    async with running_worker(settings) as worker:
        loop = worker.engine_loop
        assert loop is not None
        decoded_before = loop.engine.tokens_decoded
        async with Client.from_url(redis_url, prefix=prefix) as client:
            results = await asyncio.gather(
                *(
                    client.chat(
                        [{"role": "system", "content": LONG_PROMPT}, {"role": "user", "content": f"Question {i}?"}],
                        max_tokens=4,
                        temperature=0,
                    )
                    for i in range(4)
                )
            )
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
        generated = sum(r.usage.completion_tokens for r in results)
        prefilled = loop.engine.tokens_decoded - decoded_before - (generated - len(results))
    prompt = results[0].usage.prompt_tokens
    assert prompt > 600
    assert prefilled < prompt + 4 * 30, f"{prefilled} prompt tokens computed for four {prompt}-token chats"
    assert sum(r.usage.cached_tokens for r in results) >= 3 * (prompt - 30)


async def test_n_choices_compute_the_prompt_once_and_each_equals_its_seed_alone(
    redis_url: str, model_path: Path, prefix: str
) -> None:
    async with running_worker(worker_settings(redis_url, model_path, prefix)) as worker:
        loop = worker.engine_loop
        assert loop is not None
        async with Client.from_url(redis_url, prefix=prefix) as client:
            decoded_before = loop.engine.tokens_decoded
            choices = await client.completion_choices(LONG_PROMPT, 3, max_tokens=12, temperature=1.0, seed=40)
            decoded = loop.engine.tokens_decoded - decoded_before
            alone = [
                await client.completion(LONG_PROMPT, max_tokens=12, temperature=1.0, seed=40 + i) for i in range(3)
            ]
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    prompt = choices[0].usage.prompt_tokens
    generated = sum(c.usage.completion_tokens for c in choices)
    assert decoded - generated < prompt + 10, f"{decoded - generated} prompt tokens computed for 3 choices"
    assert [c.text for c in choices] == [a.text for a in alone]
    assert len({c.text for c in choices}) > 1, "the choices did not sample independently"


class LoopByHand:
    """An EngineLoop run on this thread: each serve() takes every request given before its first step, so they
    meet in one admission round."""

    def __init__(self, model_path: Path, n_seq_max: int) -> None:
        self.engine = Engine(EngineConfig(model_path, n_ctx=1024 * n_seq_max, n_seq_max=n_seq_max, n_batch=256))
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.loop = EngineLoop(self.engine, token_budget=256, emit=self._collect)

    def _collect(self, out: list[Outgoing], _stats: StepStats | None) -> None:
        for outgoing in out:
            self.events[outgoing.request_key].append(outgoing.event)

    def serve(self, *requests: Request) -> None:
        """Run the loop until these requests (and anything before them) are done."""
        for request in requests:
            self.loop.submit(request, time.time())
        self.loop.stop(600.0)
        self.loop.run()

    def answer(self, request: Request) -> tuple[str, DoneEvent]:
        """A finished request's text and final event."""
        stream = self.events[request.key]
        done = stream[-1]
        assert isinstance(done, DoneEvent), done
        return "".join(e.text for e in stream if isinstance(e, TokenEvent)), done


def greedy_chat(name: str, text: str, max_tokens: int) -> Request:
    """A greedy one-message chat request."""
    messages = (ChatMessage("user", text),)
    return Request(f"{name}00000", "client00", RequestKind.CHAT, messages, params=SamplingParams(max_tokens, 0.0))


def test_a_copy_and_an_eviction_in_one_step_keep_the_copied_kv(model_path: Path) -> None:
    """Three idle sequences, then in one step two repeats, each copying its earlier run into an evicted id: the
    second must not evict the first one's source. Found with identical greedy chats in flight: a repeat was
    decoded on the empty copy of an evicted sequence and answered something else."""
    by_hand = LoopByHand(model_path, n_seq_max=3)
    try:
        # Finishing in the order oldest, first, second makes the oldest the least recently used.
        oldest = Request(
            "oldest00000", "client00", RequestKind.COMPLETION, prompt="Count", params=SamplingParams(2, 0.0)
        )
        first, second = greedy_chat("first", "Say 1.", 8), greedy_chat("second", "Say 2.", 12)
        by_hand.serve(oldest, first, second)
        first_again, second_again = greedy_chat("firstagain", "Say 1.", 8), greedy_chat("secondagain", "Say 2.", 12)
        by_hand.serve(first_again, second_again)
        for earlier, repeat in ((first, first_again), (second, second_again)):
            (earlier_text, _), (text, done) = by_hand.answer(earlier), by_hand.answer(repeat)
            assert done.usage.cached_tokens == done.usage.prompt_tokens - 1, "the repeat reuses the earlier KV"
            assert text == earlier_text, repeat.id
    finally:
        by_hand.engine.close()


def test_a_prefix_missing_from_the_kv_is_recomputed_not_decoded_on_nothing(model_path: Path) -> None:
    """The loop checks that llama.cpp holds what the bookkeeping says before it decodes onto a cached prefix:
    llama.cpp itself accepts any position on an empty sequence."""
    by_hand = LoopByHand(model_path, n_seq_max=2)
    try:
        first = greedy_chat("first", "Say 1.", 8)
        by_hand.serve(first)
        (idle,) = by_hand.loop.kv.cells_held()
        by_hand.engine.free_sequence(idle)  # its KV lost behind the bookkeeping's back
        again = greedy_chat("again", "Say 1.", 8)
        by_hand.serve(again)
        (first_text, _), (text, done) = by_hand.answer(first), by_hand.answer(again)
        assert done.usage.cached_tokens == 0 and text == first_text
    finally:
        by_hand.engine.close()
