"""The gateway's pure parts, on plain data: OpenAI bodies become queue requests or 400s (never a crash), failures
get their statuses, usage counts each prompt once, and API keys are kept as digests naming tenants."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaq.client import RequestFailed
from llamaq.client.gateway_auth import ApiKeys
from llamaq.client.gateway_guards import Guards, default_allowed_hosts
from llamaq.client.gateway_openai import (
    CONVERSATION_HEADER,
    ApiError,
    Endpoint,
    failure_error,
    parse_body,
    parse_call,
    tenant_of_user,
)
from llamaq.client.gateway_responses import Shape, usage_body
from llamaq.client.options import sampling_params
from llamaq.protocol import ChatMessage, ErrorCode, Keys, Request, RequestKind, Usage, encode_request

HELLO = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, **fields}


def test_a_chat_body_maps_to_request_options() -> None:
    call = parse_call(
        Endpoint.CHAT,
        chat(
            max_completion_tokens=7,
            max_tokens=99,
            temperature=0,
            top_p=0.5,
            top_k=3,
            min_p=0.1,
            seed=4,
            stop="END",
            user="alice",
            timeout=2.5,
            stream=True,
            stream_options={"include_usage": True},
        ),
        {CONVERSATION_HEADER: "conv-0123456789"},
    )
    assert call.messages == (ChatMessage("user", "hi"),)
    assert call.options == {
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 0.5,
        "min_p": 0.1,
        "top_k": 3,
        "seed": 4,
        "stop": ("END",),
        "deadline_s": 2.5,
        "conversation": "conv-0123456789",
    }
    assert call.stream and call.include_usage and call.user == "alice" and call.n_choices == 1


def test_content_parts_developer_role_and_completion_defaults() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    call = parse_call(Endpoint.CHAT, chat(messages=[{"role": "developer", "content": parts}]), {})
    assert call.messages == (ChatMessage("system", "a\nb"),)
    completion = parse_call(Endpoint.COMPLETIONS, {"prompt": ["x", "y"], "n": 2}, {})
    assert completion.prompts == ("x", "y") and completion.n_choices == 4
    assert completion.options["max_tokens"] == 16  # OpenAI's default for /v1/completions
    assert not parse_call(Endpoint.CHAT, chat(stream_options={"include_usage": True}), {}).include_usage


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=True), "temperature"),
        (chat(max_tokens=1.5), "max_tokens"),
        (chat(seed=2**64), "seed"),
        (chat(top_p=10**400), "top_p"),
        (chat(n=0), "n"),
        (chat(n=17), "n"),
        (chat(n=2, conversation="conv-0123456789"), "n"),
        (chat(stop=[1]), "stop"),
        (chat(stream="yes"), "stream"),
        (chat(stream=True, stream_options=[]), "stream_options"),
        (chat(model=3), "model"),
        (chat(conversation="short"), "conversation"),
        (chat(timeout=0), "timeout"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(logprobs=True), "logprobs"),
        (chat(response_format={"type": "json_object"}), "response_format"),
    ],
)
def test_malformed_chat_bodies_are_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_call(Endpoint.CHAT, body, {})
    assert refused.value.status == 400 and refused.value.param == param
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


def test_malformed_completion_bodies_and_json_are_400() -> None:
    for prompt in (None, [], [1, 2], [[1, 2]], 5):
        with pytest.raises(ApiError, match="prompt"):
            parse_call(Endpoint.COMPLETIONS, {"prompt": prompt}, {})
    for raw in (b"", b"{", b"[]", b"null", b"\xff", b"[" * 100_000):
        with pytest.raises(ApiError) as refused:
            parse_body(raw)
        assert refused.value.status == 400
    with pytest.raises(ApiError, match="differ"):
        parse_call(Endpoint.CHAT, chat(conversation="conv-aaaaaaaa"), {CONVERSATION_HEADER: "conv-bbbbbbbb"})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    *("model", "messages", "prompt", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens"),
    *("temperature", "top_p", "top_k", "min_p", "seed", "stop", "user", "timeout", "conversation", "tools"),
    *("frequency_penalty", "presence_penalty", "repeat_penalty", "repeat_last_n", "logprobs", "response_format"),
]
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": JSON}), max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    endpoint=st.sampled_from(Endpoint),
    body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
    messages=MESSAGES,
)
def test_any_json_is_a_call_or_a_400_never_a_crash(endpoint: Endpoint, body: dict[str, Any], messages: Any) -> None:
    """Whatever JSON arrives, the gateway either refuses it with a 400 or builds a request that encodes."""
    body.setdefault("messages", messages)
    try:
        call = parse_call(endpoint, body, {})
    except ApiError as refused:
        assert refused.status == 400
        return
    params, _ = sampling_params(call.options)
    kind = RequestKind.CHAT if call.messages is not None else RequestKind.COMPLETION
    for prompt in call.prompts or ("",):
        request = Request(
            "r" * 16, "c" * 16, kind, messages=call.messages or (), prompt=prompt, params=params, tenant="t"
        )
        assert encode_request(request, Keys())


def test_failures_get_openai_statuses() -> None:
    expected = {
        ErrorCode.INVALID_REQUEST: 400,
        ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
        ErrorCode.OVERLOADED: 429,
        ErrorCode.DEADLINE_EXCEEDED: 504,
        ErrorCode.CANCELLED: 503,
        ErrorCode.INTERNAL: 500,
    }
    for code, status in expected.items():
        error = failure_error(RequestFailed(code, "why"))
        assert (error.status, error.code, error.message) == (status, code.value, "why")
    assert failure_error(RequestFailed(ErrorCode.OVERLOADED, "full")).headers == {"Retry-After": "1"}


def test_usage_counts_each_prompt_once() -> None:
    usages = [Usage(10, 3, 0), Usage(10, 4, 9), Usage(20, 5, 0), Usage(20, 6, 19)]
    assert usage_body(usages, n=2) == {
        "prompt_tokens": 30,
        "completion_tokens": 18,
        "total_tokens": 48,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_chunks_have_openais_shape() -> None:
    call = parse_call(Endpoint.CHAT, chat(stream=True, stream_options={"include_usage": True}), {})
    shape = Shape(call, "abc", 1, "model")
    assert shape.chunk(0, None)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert shape.chunk(0, "x")["choices"][0]["delta"] == {"content": "x"}
    assert shape.chunk(0, "", "stop")["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert shape.chunk(0, "x")["usage"] is None and shape.id == "chatcmpl-abc"
    assert shape.usage_chunk([Usage(1, 2, 0)])["choices"] == []


def test_user_becomes_a_fairness_key() -> None:
    assert tenant_of_user("alice.b") == "alice.b"
    assert tenant_of_user("alice@example.com") == "u-" + hashlib.sha256(b"alice@example.com").hexdigest()[:16]
    assert tenant_of_user(None) is None
    # A name with a trailing newline passed the tenant pattern (`$` matches before it), then the worker refused it.
    assert tenant_of_user("alice\n") == "u-" + hashlib.sha256(b"alice\n").hexdigest()[:16]


def test_host_names_are_compared_without_port_case_or_trailing_dot() -> None:
    guards = Guards(default_allowed_hosts("192.168.1.5"))
    for header in ("localhost:8080", "LOCALHOST", "127.0.0.1:80", "[::1]:8080", "localhost.", "192.168.1.5:8080"):
        assert guards.host_allowed(header), header
    for header in ("evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io", "[::2]:8080", ""):
        assert not guards.host_allowed(header), header
    assert guards.host_allowed(None), "only non-browser clients send no Host"
    named = Guards(("chat.example.com", ".svc.cluster.local"))
    assert named.host_allowed("Chat.Example.com:443") and named.host_allowed("llamaq-gateway.llamaq.svc.cluster.local")
    assert not named.host_allowed("localhost") and not named.host_allowed("example.com")
    assert Guards(("*",)).host_allowed("anything.at.all")


def test_api_keys_are_digests_that_name_tenants(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# tenant:key\nacme:sk-acme-12345678\n\nglobex:sk-globex-1234:with-colon\n")
    keys = ApiKeys.load(path, "initech:sk-initech-123, umbrella:sk-umbrella-12")
    assert keys.enabled and len(keys) == 4
    assert keys.tenants == {"acme", "globex", "initech", "umbrella"}
    assert keys.tenant_for("Bearer sk-acme-12345678") == "acme"
    assert keys.tenant_for("bearer  sk-globex-1234:with-colon ") == "globex"
    assert keys.tenant_for("Bearer sk-umbrella-12") == "umbrella"
    for header in (None, "", "Bearer", "Bearer nope-nope-nope", "Basic sk-acme-12345678", "sk-acme-12345678"):
        assert keys.tenant_for(header) is None
    assert "sk-acme" not in repr(vars(keys))  # only digests are kept
    assert not ApiKeys.load(None, None).enabled


@pytest.mark.parametrize("entry", ["no-colon-here", "bad tenant!:sk-12345678", ":sk-12345678", "acme:short"])
def test_malformed_key_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="LLAMAQ_API_KEYS"):
        ApiKeys.load(None, entry)
