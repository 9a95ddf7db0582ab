"""The gateway keeps API keys' tenants apart and browsers out: one key's prompt never shows in another's
`cached_tokens`, one conversation id names one conversation per key's tenant, a tenant past its limits gets 429
with Retry-After, and DNS rebinding, cross-site text/plain posts and unconfigured CORS are refused."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletionMessageParam

from llamaq.client import Client
from llamaq.client.gateway import GatewaySettings, running_gateway
from llamaq.client.gateway_auth import ApiKeys
from llamaq.protocol import MAX_TENANT_IN_FLIGHT_FIELD, Keys, owner_of
from llamaq.worker.heartbeat import WorkerIdentity, WorkerLoad, beat

from .gateway_serving import Served, serving

KEYS = ApiKeys.load(None, "acme:sk-acme-0123456789,globex:sk-globex-0123456789")
HELLO = {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
async def served(redis_url: str, model_path: Path) -> AsyncIterator[Served]:
    """One worker and an open gateway for the module."""
    async with serving(redis_url, model_path) as served:
        yield served


@pytest.fixture
async def keyed(served: Served) -> AsyncIterator[str]:
    """A gateway with two API keys (tenants acme and globex) in front of the module's worker; its base URL."""
    settings = GatewaySettings(served.redis_url, prefix=served.prefix, api_keys=KEYS, process_metrics=False)
    async with running_gateway(settings) as url:
        yield url


def api(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def secret_chat(secret: str) -> list[ChatCompletionMessageParam]:
    system = f"You answer for the Blue Harbour company. The staff portal password is {secret}. Never tell it."
    return [{"role": "system", "content": system}, {"role": "user", "content": "What are your opening hours?"}]


async def cached(client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam], **extra: object) -> int:
    answer = await client.chat.completions.create(
        model="m", messages=messages, max_tokens=2, temperature=0, extra_body=extra or None
    )
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    return answer.usage.prompt_tokens_details.cached_tokens or 0


@pytest.mark.slow
async def test_another_keys_secret_prompt_never_shows_in_cached_tokens(keyed: str) -> None:
    """The guess-the-secret probe through the OpenAI API: before tenants were isolated the right guess came back
    with most of its prompt in prompt_tokens_details.cached_tokens."""
    victim, spy = api(keyed, "sk-globex-0123456789"), api(keyed, "sk-acme-0123456789")
    await cached(victim, secret_chat("TANGERINE-42"))
    # Each guess with a salt of its own, so that neither finds the spy's other guess.
    guesses = [await cached(spy, secret_chat(guess), cache_salt=guess) for guess in ("TANGERINE-42", "PAPAYA-17")]
    assert guesses == [0, 0]
    assert await cached(victim, secret_chat("TANGERINE-42")) > 20, "the key's own repeat is still cached"
    # vLLM's cache_salt body field: the same key, another salt, nothing shared.
    assert await cached(victim, secret_chat("TANGERINE-42"), cache_salt="end-user-7") == 0


@pytest.mark.slow
async def test_two_keys_sending_one_conversation_id_have_two_conversations(keyed: str, served: Served) -> None:
    """Before, the second key continued (and overwrote) the first key's history."""
    conversation = f"conv{secrets.token_hex(8)}"
    header = {"X-Conversation-Id": conversation}
    for key, text in (("sk-acme-0123456789", "I am Acme."), ("sk-globex-0123456789", "I am Globex.")):
        await api(keyed, key).chat.completions.create(
            model="m", messages=[{"role": "user", "content": text}], max_tokens=2, temperature=0, extra_headers=header
        )
    async with Client.from_url(served.redis_url, prefix=served.prefix) as direct:
        stored = {
            tenant: (await direct.get_conversation(conversation, tenant=tenant))["messages"][0]["content"]
            for tenant in ("acme", "globex")
        }
    assert stored == {"acme": "I am Acme.", "globex": "I am Globex."}


async def test_a_tenant_past_its_limit_gets_429_with_retry_after(redis_url: str) -> None:
    """A ghost worker's heartbeat and a bound of one request in flight per tenant, which acme already has."""
    prefix = f"g{secrets.token_hex(4)}"
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url)
    settings = GatewaySettings(redis_url, prefix=prefix, api_keys=KEYS, process_metrics=False)
    try:
        await beat(
            redis, keys, WorkerIdentity("ghost", "ghost-model", 1, 1024, "per-sequence", time.time()), WorkerLoad()
        )
        await redis.hset(keys.config, MAX_TENANT_IN_FLIGHT_FIELD, 1)
        busy = owner_of("acme", "unused00")
        await redis.zadd(keys.tenant_in_flight(busy), {"earlier/request": (time.time() + 600) * 1000})
        async with running_gateway(settings) as url:
            with pytest.raises(openai.RateLimitError) as refused:
                await api(url, "sk-acme-0123456789").chat.completions.create(
                    model="m",
                    messages=HELLO["messages"],
                    max_tokens=2,  # type: ignore[arg-type]
                )
        assert refused.value.status_code == 429 and refused.value.code == "overloaded"
        assert refused.value.response.headers["Retry-After"] == "1"
        assert "in flight" in refused.value.message
    finally:
        await redis.delete(keys.config, keys.workers, keys.heartbeat("ghost"), keys.tenant_in_flight(busy))
        await redis.aclose()


@pytest.fixture
async def bare(redis_url: str) -> AsyncIterator[str]:
    """A gateway with no worker behind it, bound to 127.0.0.1 with the default Host allowlist."""
    settings = GatewaySettings(redis_url, prefix=f"g{secrets.token_hex(4)}", process_metrics=False)
    async with running_gateway(settings) as url:
        yield url


async def test_a_dns_rebinding_host_is_refused_and_loopback_names_are_not(bare: str) -> None:
    """A page on evil.example whose name the attacker re-points at 127.0.0.1 sends `Host: evil.example`."""
    port = bare.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{bare}/v1/chat/completions", json=HELLO, headers={"Host": "evil.example"}) as r:
            error = (await r.json())["error"]
            assert r.status == 403 and error["code"] == "host_not_allowed"
            assert "evil.example" in error["message"] and "--allowed-hosts" in error["message"]
        async with session.get(f"{bare}/", headers={"Host": f"evil.example:{port}"}) as page:
            assert page.status == 403, "the chat page is refused too"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
            async with session.get(f"{bare}/v1/models", headers={"Host": host}) as r:
                assert r.status == 200, host
        async with session.get(f"{bare}/healthz", headers={"Host": "10.1.2.3:8080"}) as probe:
            assert probe.status == 200, "probes address pods by IP"


async def test_allowed_hosts_can_be_named(redis_url: str) -> None:
    settings = GatewaySettings(
        redis_url, prefix=f"g{secrets.token_hex(4)}", process_metrics=False, allowed_hosts=("chat.example.com",)
    )
    async with running_gateway(settings) as url, aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models", headers={"Host": "chat.example.com"}) as named:
            assert named.status == 200
        async with session.get(f"{url}/v1/models") as loopback:
            assert loopback.status == 403, "naming hosts replaces the default list"


async def test_a_body_not_sent_as_json_is_refused(bare: str) -> None:
    """A cross-site HTML form can POST text/plain (or a urlencoded form) without a CORS preflight."""
    body = json.dumps(HELLO)
    async with aiohttp.ClientSession() as session:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            headers = {"Content-Type": content_type}
            async with session.post(f"{bare}/v1/chat/completions", data=body, headers=headers) as r:
                error = (await r.json())["error"]
                assert r.status == 415 and error["code"] == "unsupported_media_type", content_type
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        async with session.post(f"{bare}/v1/chat/completions", data=body, headers=json_type) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "no_worker", "JSON passes the check"


async def test_cors_preflights_are_answered_only_for_configured_origins(redis_url: str, bare: str) -> None:
    preflight = {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as session:
        async with session.options(f"{bare}/v1/chat/completions", headers=preflight) as off:
            assert off.status == 405 and "Access-Control-Allow-Origin" not in off.headers
        async with session.get(f"{bare}/v1/models", headers={"Origin": "https://chat.example.com"}) as plain:
            assert "Access-Control-Allow-Origin" not in plain.headers
    settings = GatewaySettings(
        redis_url,
        prefix=f"g{secrets.token_hex(4)}",
        api_keys=KEYS,
        process_metrics=False,
        cors_origins=("https://chat.example.com",),
    )
    async with running_gateway(settings) as url, aiohttp.ClientSession() as session:
        async with session.options(f"{url}/v1/chat/completions", headers=preflight) as allowed:
            assert allowed.status == 204, "a preflight carries no API key"
            assert allowed.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
            assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
        other = {**preflight, "Origin": "https://evil.example"}
        async with session.options(f"{url}/v1/chat/completions", headers=other) as refused:
            assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers
        headers = {"Origin": "https://chat.example.com", "Authorization": "Bearer sk-acme-0123456789"}
        async with session.get(f"{url}/v1/models", headers=headers) as answer:
            assert answer.status == 200
            assert answer.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
