"""The wire format: requests and events survive a round trip, and every malformed entry is invalid_request."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from llamaq.protocol import (
    ChatMessage,
    ConversationCommand,
    ConversationOp,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    History,
    Keys,
    Limits,
    ProtocolError,
    Request,
    RequestKind,
    SamplingParams,
    Sender,
    Timings,
    TokenEvent,
    Usage,
    decode_event,
    decode_history,
    decode_request,
    encode_event,
    encode_history,
    encode_request,
    identify_request,
    identify_sender,
)

KEYS = Keys()
LIMITS = Limits()
REQUEST_ID = "a" * 32
CLIENT_ID = "c" * 16


def chat_request(**overrides: Any) -> Request:
    base = Request(
        id=REQUEST_ID,
        client_id=CLIENT_ID,
        kind=RequestKind.CHAT,
        messages=(ChatMessage("user", "hi"),),
        params=SamplingParams(max_tokens=5, temperature=0.0, stop=("\n",), seed=7),
        deadline=2_000_000_000.0,
        created=1_700_000_000.0,
    )
    return Request(**{**base.__dict__, **overrides})


def wire(**changes: Any) -> bytes:
    body = msgpack.unpackb(encode_request(chat_request(), KEYS), raw=False)
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


def test_request_round_trip() -> None:
    request = chat_request()
    assert decode_request(encode_request(request, KEYS), KEYS, LIMITS) == request


def test_completion_round_trip() -> None:
    request = chat_request(kind=RequestKind.COMPLETION, messages=(), prompt="Once upon a time")
    assert decode_request(encode_request(request, KEYS), KEYS, LIMITS) == request


def test_unset_params_take_llama_server_defaults() -> None:
    decoded = decode_request(wire(params={}), KEYS, LIMITS)
    assert decoded.params == SamplingParams()
    assert (decoded.params.temperature, decoded.params.top_k, decoded.params.top_p) == (0.8, 40, 0.95)
    assert decoded.params.min_p == 0.05 and decoded.params.max_tokens is None


def test_ignore_eos_round_trips_and_is_left_off_the_wire_when_false() -> None:
    wanted = chat_request(params=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert decode_request(encode_request(wanted, KEYS), KEYS, LIMITS).params.ignore_eos is True
    plain = msgpack.unpackb(encode_request(chat_request(), KEYS))
    assert "ignore_eos" not in plain["params"], "workers older than the field would refuse it"
    for bad in (1, "yes", None):
        with pytest.raises(ProtocolError) as refused:
            decode_request(wire(params={"ignore_eos": bad}), KEYS, LIMITS)
        assert refused.value.code is ErrorCode.INVALID_REQUEST


def test_keys_share_the_client_hash_tag() -> None:
    reply, cancel = KEYS.reply(CLIENT_ID, REQUEST_ID), KEYS.cancel(CLIENT_ID, REQUEST_ID)
    tag = f"{{c:{CLIENT_ID}}}"
    assert tag in reply and tag in cancel
    assert KEYS.requests == "llamaq:{q:default}:requests"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1not msgpack", id="not-msgpack"),
        pytest.param(msgpack.packb([1, 2, 3]), id="not-a-map"),
        pytest.param(msgpack.packb({1: 2}), id="non-string-keys"),
        pytest.param(wire(v=2), id="wrong-version"),
        pytest.param(wire(v=...), id="missing-version"),
        pytest.param(wire(id=...), id="missing-id"),
        pytest.param(wire(id="short"), id="short-id"),
        pytest.param(wire(id="x" * 30 + "}{"), id="id-with-braces"),
        pytest.param(wire(client=5), id="mistyped-client"),
        pytest.param(wire(reply="llamaq:{c:other}:reply:x"), id="forged-reply-key"),
        pytest.param(wire(kind="embedding"), id="unknown-kind"),
        pytest.param(wire(messages=[]), id="no-messages"),
        pytest.param(wire(messages="hi"), id="messages-not-list"),
        pytest.param(wire(messages=[{"role": "user"}]), id="message-without-content"),
        pytest.param(wire(messages=[{"role": "user", "content": 3}]), id="mistyped-content"),
        pytest.param(wire(messages=[{"role": "user", "content": "a\x00b"}]), id="nul-in-content"),
        pytest.param(wire(prompt="also"), id="chat-with-prompt"),
        pytest.param(wire(params={"temperature": -1}), id="negative-temperature"),
        pytest.param(wire(params={"temperature": float("nan")}), id="nan-temperature"),
        pytest.param(wire(params={"top_p": 1.5}), id="top-p-above-one"),
        pytest.param(wire(params={"max_tokens": 0}), id="zero-max-tokens"),
        pytest.param(wire(params={"max_tokens": 10**9}), id="absurd-max-tokens"),
        pytest.param(wire(params={"max_tokens": True}), id="bool-max-tokens"),
        pytest.param(wire(params={"seed": -1}), id="negative-seed"),
        pytest.param(wire(params={"stop": [""]}), id="empty-stop"),
        pytest.param(wire(params={"stop": ["x"] * 9}), id="too-many-stops"),
        pytest.param(wire(params={"mirostat": 2}), id="unknown-param"),
        pytest.param(wire(params=[1]), id="params-not-map"),
        pytest.param(wire(deadline="soon"), id="mistyped-deadline"),
        pytest.param(wire(extra=1), id="unknown-field"),
        pytest.param(wire(messages=[{"role": "user", "content": "x" * 400_001}]), id="huge-content"),
        pytest.param(b"\x91" * 100_000, id="deep-nesting"),
    ],
)
def test_malformed_request_is_invalid_request(data: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(data, KEYS, LIMITS)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_oversized_entry_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_request(b"\x00" * (LIMITS.max_entry_bytes + 1), KEYS, LIMITS)


def test_invalid_entry_with_valid_ids_can_still_be_answered() -> None:
    assert identify_request(wire(v=9), KEYS, LIMITS) == KEYS.reply(CLIENT_ID, REQUEST_ID)
    assert identify_request(b"garbage", KEYS, LIMITS) is None
    assert identify_request(wire(client="{evil}"), KEYS, LIMITS) is None


def test_an_invalid_entry_names_the_owner_it_was_counted_under() -> None:
    key = f"{CLIENT_ID}/{REQUEST_ID}"
    assert identify_sender(wire(v=9), KEYS, LIMITS) == Sender(KEYS.reply(CLIENT_ID, REQUEST_ID), f"c.{CLIENT_ID}", key)
    sender = identify_sender(wire(tenant="bad tenant!"), KEYS, LIMITS)
    assert sender is not None and sender.owner == "t.bad tenant!", "as the client computed it"
    assert identify_sender(wire(tenant=7, v=2), KEYS, LIMITS) == identify_sender(wire(v=9), KEYS, LIMITS)


def test_cache_salt_is_optional_text_and_not_for_ops() -> None:
    assert decode_request(wire(cache_salt="user-1"), KEYS, LIMITS).cache_salt == "user-1"
    assert decode_request(wire(cache_salt=None), KEYS, LIMITS).cache_salt is None
    for bad in ("", 7, "a" * 257, "x\x00y"):
        with pytest.raises(ProtocolError):
            decode_request(wire(cache_salt=bad), KEYS, LIMITS)
    with pytest.raises(ProtocolError, match="cache_salt"):
        decode_request(op_wire(op="get", cache_salt="user-1"), KEYS, LIMITS)


@pytest.mark.parametrize(
    "event",
    [
        TokenEvent(n=0, text="héllo", tokens=(1, 2)),
        DoneEvent(
            n=3,
            finish_reason=FinishReason.LENGTH,
            usage=Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=0),
            timings=Timings(queue_ms=1.0, prefill_ms=2.0, decode_ms=3.0, ttft_ms=3.0, total_ms=6.0),
        ),
        ErrorEvent(n=1, code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long"),
    ],
)
def test_event_round_trip(event: TokenEvent | DoneEvent | ErrorEvent) -> None:
    assert decode_event(encode_event(event)) == event


def test_conversation_fields_round_trip() -> None:
    turn = chat_request(conversation="conv-0001", append=True)
    assert decode_request(encode_request(turn, KEYS), KEYS, LIMITS) == turn
    fork = chat_request(
        kind=RequestKind.OP,
        messages=(),
        conversation="conv-0001",
        command=ConversationCommand(ConversationOp.FORK, into="conv-0002"),
    )
    assert decode_request(encode_request(fork, KEYS), KEYS, LIMITS) == fork


def test_list_states_is_the_one_op_without_a_conversation() -> None:
    request = decode_request(op_wire(op="list_states", conversation=None), KEYS, LIMITS)
    assert request.command is not None and request.command.op is ConversationOp.LIST_STATES
    assert request.conversation is None


def test_usage_and_timings_fields_a_client_does_not_know_are_ignored() -> None:
    event = DoneEvent(
        n=3,
        finish_reason=FinishReason.STOP,
        usage=Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=4, restored_tokens=4, prefix_source="disk"),
        timings=Timings(queue_ms=1.0, prefill_ms=2.0, decode_ms=3.0, ttft_ms=3.0, total_ms=6.0, restore_ms=0.5),
    )
    body = msgpack.unpackb(encode_event(event), raw=False)
    body["usage"]["from_the_future"] = 1
    body["timings"]["also_new_ms"] = 2.0
    assert decode_event(msgpack.packb(body, use_bin_type=True)) == event


def op_wire(**fields: Any) -> bytes:
    body = msgpack.unpackb(encode_request(chat_request(), KEYS), raw=False)
    body.pop("messages")
    body.update({"kind": "op", "conversation": "conv-0001", **fields})
    return msgpack.packb({k: v for k, v in body.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(op_wire(op="explode"), id="unknown-op"),
        pytest.param(op_wire(op="rewind"), id="rewind-without-target"),
        pytest.param(op_wire(op="rewind", to_message=1, drop_tokens=2), id="rewind-with-both"),
        pytest.param(op_wire(op="rewind", to_message=-1), id="negative-message"),
        pytest.param(op_wire(op="rewind", drop_tokens=0), id="zero-tokens"),
        pytest.param(op_wire(op="fork"), id="fork-without-into"),
        pytest.param(op_wire(op="fork", into="{bad}"), id="fork-into-bad-id"),
        pytest.param(op_wire(op="get", into="conv-0002"), id="into-without-fork"),
        pytest.param(op_wire(op="get", conversation=None), id="op-without-conversation"),
        pytest.param(op_wire(op="save_state", conversation=None), id="save-state-without-conversation"),
        pytest.param(op_wire(op="get", prompt="x"), id="op-with-prompt"),
        pytest.param(wire(conversation="no"), id="short-conversation-id"),
        pytest.param(wire(append=True), id="append-without-conversation"),
        pytest.param(wire(append="yes", conversation="conv-0001"), id="append-not-bool"),
        pytest.param(wire(op="get"), id="op-field-on-chat"),
    ],
)
def test_malformed_conversation_request_is_invalid_request(data: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(data, KEYS, LIMITS)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_history_round_trip() -> None:
    history = History(kind=RequestKind.CHAT, messages=(ChatMessage("user", "hi"),), tokens=(1, 2, 3))
    fields = {k.encode(): v for k, v in encode_history(history, "t.acme").items()}
    assert decode_history(fields, "t.acme") == history
    assert decode_history(fields, "t.other") is None, "another owner's history reads as no history"
    assert decode_history({}, "t.acme") is None
