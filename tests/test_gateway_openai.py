"""The gateway speaks the OpenAI API: the official `openai` package (sync and async, streaming and not) against a
gateway, a real Valkey and a real worker. Greedy answers equal the Python client's; a caller that goes away
cancels its requests; every failure has OpenAI's error object and the right status."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from llamaq.client import Client
from llamaq.client.gateway import READY_LINE, GatewaySettings, running_gateway
from llamaq.client.gateway_auth import ApiKeys
from llamaq.client.gateway_metrics import ANONYMOUS
from llamaq.protocol import MAX_BACKLOG_FIELD, REQUEST_FIELD, Keys
from llamaq.worker.embedded_valkey import free_port
from llamaq.worker.heartbeat import WorkerIdentity, WorkerLoad, beat

from .conftest import wait_until_idle
from .gateway_serving import Served, serving

pytestmark = pytest.mark.slow

QUESTION = "Name three colours of the rainbow."
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
DIRECT_HELLO = [{"role": "user", "content": QUESTION}]
"""HELLO for the Python client."""
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A raw prompt the model continues for hundreds of tokens without an end-of-generation token."""


@pytest.fixture(scope="module")
async def served(redis_url: str, model_path: Path) -> AsyncIterator[Served]:
    """One worker and one open gateway for the whole module."""
    async with serving(redis_url, model_path) as served:
        yield served


def sync_client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    # No retries: a test asserts on the first answer, and 429/5xx would otherwise be retried with backoff.
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def async_client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


async def gateway_sample(url: str, name: str, **labels: str) -> float:
    """A sample of a gateway's own /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_greedy_answers_equal_the_python_clients(served: Served) -> None:
    """Sync client, chat and completions, not streamed: the same text as the Python client for the same request."""
    openai_client = sync_client(served.api)
    chat = await asyncio.to_thread(
        lambda: openai_client.chat.completions.create(model="m", messages=HELLO, max_tokens=24, temperature=0)
    )
    text = await asyncio.to_thread(
        lambda: openai_client.completions.create(
            model="m", prompt="The capital of France is", max_tokens=12, temperature=0
        )
    )
    async with Client.from_url(served.redis_url, prefix=served.prefix) as client:
        direct_chat = await client.chat(DIRECT_HELLO, max_tokens=24, temperature=0)
        direct_text = await client.completion("The capital of France is", max_tokens=12, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == direct_chat.text
    assert chat.choices[0].finish_reason == direct_chat.finish_reason.value
    assert chat.usage is not None and chat.usage.prompt_tokens == direct_chat.usage.prompt_tokens
    assert chat.usage.completion_tokens == direct_chat.usage.completion_tokens
    assert chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens is not None
    assert text.object == "text_completion"
    assert text.choices[0].text == direct_text.text
    assert text.choices[0].finish_reason == "length"


async def test_streams_equal_whole_answers_with_usage_last(served: Served) -> None:
    """Async client, streamed chat and completion with include_usage: the pieces add up to the whole answer."""
    client = async_client(served.api)
    whole = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=24, temperature=0)
    stream = await client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            assert choice.index == 0
            roles += [choice.delta.role] if choice.delta.role else []
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    # The same prompt again: all of it but its last token comes from the worker's prefix cache.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1

    text_stream = await client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join([chunk.choices[0].text async for chunk in text_stream if chunk.choices])
    text = await client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert streamed == text.choices[0].text


async def test_n_choices_follow_their_seeds(served: Served) -> None:
    """n > 1 with a seed: choice i is the request sent alone with seed + i, streamed or not, each with its index."""
    client = async_client(served.api)
    whole = await client.chat.completions.create(model="m", messages=HELLO, n=3, max_tokens=16, temperature=1, seed=11)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    async with Client.from_url(served.redis_url, prefix=served.prefix) as direct:
        alone = [await direct.chat(DIRECT_HELLO, max_tokens=16, temperature=1.0, seed=11 + i) for i in range(3)]
    assert [c.message.content for c in whole.choices] == [a.text for a in alone]
    assert whole.usage is not None and whole.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    stream = await client.chat.completions.create(
        model="m", messages=HELLO, n=3, max_tokens=16, temperature=1, seed=11, stream=True
    )
    texts = ["", "", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [a.text for a in alone]

    prompts = await client.completions.create(
        model="m", prompt=["Once upon a time", "The sky is"], n=2, max_tokens=6, temperature=0
    )
    assert [c.index for c in prompts.choices] == [0, 1, 2, 3]
    assert prompts.choices[0].text == prompts.choices[1].text != prompts.choices[2].text == prompts.choices[3].text


async def test_stop_strings_end_the_answer_before_them(served: Served) -> None:
    openai_client = sync_client(served.api)
    answer = await asyncio.to_thread(
        lambda: openai_client.completions.create(model="m", prompt=COUNTING, max_tokens=40, temperature=0, stop=[" 13"])
    )
    async with Client.from_url(served.redis_url, prefix=served.prefix) as client:
        direct = await client.completion(COUNTING, max_tokens=40, temperature=0, stop=[" 13"])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].text == direct.text
    assert " 13" not in answer.choices[0].text and answer.choices[0].text.startswith(" 11, 12")


async def test_conversation_id_names_the_queues_conversation(served: Served) -> None:
    """The X-Conversation-Id header (or a `conversation` field) makes the call a turn of a named conversation."""
    conversation = f"conv{secrets.token_hex(8)}"
    client = async_client(served.api)
    first = await client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=12, temperature=0, extra_headers={"X-Conversation-Id": conversation}
    )
    history: list[ChatCompletionMessageParam] = [
        *HELLO,
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And two more?"},
    ]
    second = await client.chat.completions.create(
        model="m", messages=history, max_tokens=12, temperature=0, extra_body={"conversation": conversation}
    )
    # Callers of a gateway without API keys are all the tenant `anonymous`, which owns the conversation.
    async with Client.from_url(served.redis_url, prefix=served.prefix, tenant=ANONYMOUS) as direct:
        stored = await direct.get_conversation(conversation)
    assert [m["content"] for m in stored["messages"]][:3] == [m.get("content") for m in history]
    assert first.usage is not None and second.usage is not None and second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > first.usage.prompt_tokens


async def test_a_caller_that_goes_away_cancels_its_request(served: Served) -> None:
    """Streamed or not, closing the connection cancels the request: the worker ends it as `cancelled` at once."""
    before = served.worker_count("llamaq_requests_finished_total", reason="cancelled", code="")
    tokens_before = served.worker_count("llamaq_generation_tokens_total")
    body = {"model": "m", "prompt": COUNTING, "max_tokens": 900, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{served.api}/completions", json={**body, "stream": True})
        assert response.status == 200
        first = json.loads((await response.content.readuntil(b"\n\n"))[len(b"data: ") :])
        assert first["choices"][0]["text"]
        response.close()

        # Not streamed: the caller gives up while the worker generates.
        call = asyncio.create_task(session.post(f"{served.api}/completions", json=body))
        await asyncio.sleep(0.5)
        call.cancel()
    deadline = time.monotonic() + 10
    while served.worker_count("llamaq_requests_finished_total", reason="cancelled", code="") < before + 2:
        assert time.monotonic() < deadline, "the worker did not cancel the abandoned requests"
        await asyncio.sleep(0.05)
    await wait_until_idle(served.worker, timeout_s=5)
    # Both stopped long before their 900 tokens.
    assert served.worker_count("llamaq_generation_tokens_total") - tokens_before < 600
    assert await gateway_sample(served.url, "llamaq_gateway_requests_total", status="499") >= 2
    assert await gateway_sample(served.url, "llamaq_gateway_open_streams") == 0


async def test_invalid_requests_get_400_and_413(served: Served) -> None:
    client = sync_client(served.api)
    with pytest.raises(openai.BadRequestError) as context_length:
        await asyncio.to_thread(lambda: client.chat.completions.create(model="m", messages=HELLO, max_tokens=5000))
    assert context_length.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as worker_refused:
        await asyncio.to_thread(lambda: client.chat.completions.create(model="m", messages=HELLO, top_p=7.0))
    assert worker_refused.value.code == "invalid_request"
    async with aiohttp.ClientSession() as session:
        bad = {
            b"{not json": "not valid JSON",
            b"[1, 2]": "JSON object",
            json.dumps({"messages": HELLO, "temperature": "hot"}).encode(): "temperature",
            json.dumps({"messages": HELLO, "max_tokens": True}).encode(): "max_tokens",
            json.dumps({"messages": "hello"}).encode(): "messages",
            json.dumps({"messages": HELLO, "n": 0}).encode(): "n must be",
            json.dumps({"messages": HELLO, "seed": 10**30}).encode(): "seed",
            json.dumps({"messages": HELLO, "tools": [{"type": "function"}]}).encode(): "tool",
            json.dumps({"messages": HELLO, "conversation": "bad id!"}).encode(): "conversation",
            json.dumps({"messages": HELLO, "stream": True, "stream_options": []}).encode(): "stream_options",
            b"\xff\xfe garbage": "not valid JSON",
        }
        json_body = {"Content-Type": "application/json"}
        for payload, words in bad.items():
            async with session.post(f"{served.api}/chat/completions", data=payload, headers=json_body) as response:
                error = (await response.json())["error"]
                assert response.status == 400, payload
                assert words in error["message"] and error["type"] == "invalid_request_error", payload
        huge = json.dumps({"model": "m", "prompt": "x" * (5 << 20)}).encode()
        async with session.post(f"{served.api}/completions", data=huge, headers=json_body) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "request_too_large"
        async with session.post(
            f"{served.api}/chat/completions", json={"messages": HELLO, "stream": True, "max_tokens": 5000}
        ) as response:
            # A stream the worker refuses at once still gets its status, not a 200 with an error inside.
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "context_length_exceeded"
        async with session.get(f"{served.url}/v1/nothing") as response:
            assert response.status == 404 and "error" in await response.json()
        async with session.get(f"{served.api}/chat/completions") as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
            assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_a_passed_deadline_is_504(served: Served) -> None:
    client = async_client(served.api)
    with pytest.raises(openai.APIStatusError) as failure:
        await client.completions.create(model="m", prompt=COUNTING, max_tokens=500, extra_body={"timeout": 0.001})
    assert failure.value.status_code == 504
    assert failure.value.code == "deadline_exceeded"


async def test_api_keys_name_tenants(served: Served) -> None:
    keys = ApiKeys.load(None, "acme:sk-acme-0123456789,globex:sk-globex-0123456789")
    settings = GatewaySettings(served.redis_url, prefix=served.prefix, api_keys=keys, process_metrics=False)
    async with running_gateway(settings) as url:
        with pytest.raises(openai.AuthenticationError) as refused:
            await async_client(f"{url}/v1", "sk-wrong-0123456789").chat.completions.create(
                model="m", messages=HELLO, max_tokens=4
            )
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/chat/completions", json={"messages": HELLO}) as anonymous:
                assert anonymous.status == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
                assert (await anonymous.json())["error"]["code"] == "invalid_api_key"
            async with session.get(f"{url}/healthz") as health:
                assert health.status == 200  # probes need no key
        answer = await async_client(f"{url}/v1", "sk-acme-0123456789").chat.completions.create(
            model="m", messages=HELLO, max_tokens=4
        )
        assert answer.choices[0].message.content
        assert await gateway_sample(url, "llamaq_gateway_requests_total", tenant="acme", status="200") == 1
        assert await gateway_sample(url, "llamaq_gateway_tokens_total", tenant="acme", kind="completion") > 0


async def test_no_live_worker_is_503_and_a_full_backlog_429(redis_url: str) -> None:
    prefix = f"g{secrets.token_hex(4)}"
    keys = Keys(prefix)
    async with running_gateway(GatewaySettings(redis_url, prefix=prefix, process_metrics=False)) as url:
        client = async_client(f"{url}/v1")
        with pytest.raises(openai.APIStatusError) as nobody:
            await client.chat.completions.create(model="m", messages=HELLO, max_tokens=4)
        assert nobody.value.status_code == 503 and nobody.value.code == "no_worker"
        assert nobody.value.response.headers["Retry-After"]

        # A worker's heartbeat without the worker, and a backlog bound of one entry that a stray entry fills.
        redis = aioredis.Redis.from_url(redis_url)
        try:
            identity = WorkerIdentity("ghost-worker", "ghost-model", 1, 1024, "per-sequence", time.time())
            await beat(redis, keys, identity, WorkerLoad())
            await redis.hset(keys.config, MAX_BACKLOG_FIELD, 1)
            await redis.xadd(keys.requests, {REQUEST_FIELD: b"\x80"})
            await asyncio.sleep(1.1)  # past the gateway's one-second memory of "no worker"
            with pytest.raises(openai.RateLimitError) as overloaded:
                await client.chat.completions.create(model="m", messages=HELLO, max_tokens=4)
            assert overloaded.value.status_code == 429 and overloaded.value.code == "overloaded"
            assert overloaded.value.response.headers["Retry-After"] == "1"
            models = await client.models.list()
            assert [m.id for m in models.data] == ["ghost-model"]
        finally:
            await redis.delete(keys.requests, keys.config, keys.workers, keys.heartbeat("ghost-worker"))
            await redis.aclose()


async def test_two_gateways_share_one_worker(served: Served) -> None:
    """Gateways hold no state: calls through either reach the worker, and a conversation moves between them."""
    settings = GatewaySettings(served.redis_url, prefix=served.prefix, process_metrics=False)
    async with running_gateway(settings) as other_url:
        first, second = async_client(served.api), async_client(f"{other_url}/v1")
        # Each question twice, through both gateways at once: the repeat copies the other's KV while both run.
        questions = [f"Say the number {i // 2} in words." for i in range(8)]
        answers = await asyncio.gather(
            *[
                (first, second)[i % 2].chat.completions.create(
                    model="m", messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
                )
                for i, question in enumerate(questions)
            ]
        )
        assert len({a.id for a in answers}) == 8
        async with Client.from_url(served.redis_url, prefix=served.prefix) as direct:
            alone = [
                await direct.chat([{"role": "user", "content": q}], max_tokens=8, temperature=0) for q in questions
            ]
        assert [a.choices[0].message.content for a in answers] == [a.text for a in alone]

        conversation = f"conv{secrets.token_hex(8)}"
        turn = await first.chat.completions.create(
            model="m", messages=HELLO, max_tokens=8, temperature=0, extra_body={"conversation": conversation}
        )
        history: list[ChatCompletionMessageParam] = [
            *HELLO,
            {"role": "assistant", "content": turn.choices[0].message.content or ""},
            {"role": "user", "content": "Thanks."},
        ]
        again = await second.chat.completions.create(
            model="m",
            messages=history,
            max_tokens=8,
            temperature=0,
            extra_body={"conversation": conversation},
        )
        assert turn.usage is not None and again.usage is not None and again.usage.prompt_tokens_details is not None
        assert (again.usage.prompt_tokens_details.cached_tokens or 0) >= turn.usage.prompt_tokens


@pytest.mark.parametrize("keys", ["", "acme:sk-acme-0123456789"])
async def test_the_command_says_who_it_serves_and_stops_on_sigterm(served: Served, keys: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "llamaq.client.gateway", "--redis-url", served.redis_url]
    command += ["--prefix", served.prefix, "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLAMAQ_API_KEYS": keys}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert process.stdout is not None
        banner = await asyncio.to_thread(_read_until, process.stdout, READY_LINE)
        assert ("anyone who can reach" in banner) == (not keys)
        assert ("tenants acme" in banner) == bool(keys)
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as health:
            assert health.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _read_until(stream: IO[str], line: str) -> str:
    seen = []
    for text in stream:
        seen.append(text)
        if text.strip() == line:
            return "".join(seen)
    raise AssertionError(f"the gateway exited before it was ready: {''.join(seen)}")
