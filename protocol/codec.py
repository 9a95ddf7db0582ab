"""msgpack codecs for requests and events, with validation that turns any bad input into a ProtocolError."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from .conversation import command_to_wire, parse_command
from .errors import ErrorCode, ProtocolError, invalid
from .keys import Keys, is_valid_id, is_valid_name
from .limits import Limits
from .messages import (
    PROTOCOL_VERSION,
    ChatMessage,
    ConversationOp,
    DoneEvent,
    ErrorEvent,
    Event,
    FinishReason,
    Request,
    RequestKind,
    ResultEvent,
    SamplingParams,
    Timings,
    TokenEvent,
    Usage,
    owner_of,
)

REQUEST_FIELD = b"m"
"""The one field of a request stream entry; its value is the msgpack-encoded request map."""
EVENT_FIELD = b"e"
"""The one field of a reply stream entry; its value is the msgpack-encoded event map."""

_KNOWN_REQUEST_KEYS = frozenset(
    {
        "v",
        "id",
        "client",
        "reply",
        "kind",
        "messages",
        "prompt",
        "params",
        "deadline",
        "created",
        "conversation",
        "append",
        "op",
        "to_message",
        "drop_tokens",
        "into",
        "priority",
        "tenant",
        "cache_salt",
    }
)
MAX_PRIORITY = 100
MAX_CACHE_SALT_CHARS = 256
_PARAM_NAMES = frozenset(SamplingParams.__dataclass_fields__)


def encode_request(request: Request, keys: Keys) -> bytes:
    """Serialise a request to the bytes stored in its stream entry."""
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request.id,
        "client": request.client_id,
        "reply": keys.reply(request.client_id, request.id),
        "kind": request.kind.value,
        "params": _params_to_wire(request.params),
        "created": request.created,
    }
    if request.kind is RequestKind.CHAT:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    elif request.kind is RequestKind.COMPLETION:
        body["prompt"] = request.prompt
    if request.command is not None:
        body.update(command_to_wire(request.command))
    if request.conversation is not None:
        body["conversation"] = request.conversation
    if request.append:
        body["append"] = True
    if request.deadline is not None:
        body["deadline"] = request.deadline
    if request.priority:
        body["priority"] = request.priority
    if request.tenant is not None:
        body["tenant"] = request.tenant
    if request.cache_salt is not None:
        body["cache_salt"] = request.cache_salt
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_request(data: bytes, keys: Keys, limits: Limits) -> Request:
    """Parse and validate a request entry; raise ProtocolError(invalid_request) on anything malformed."""
    body = _unpack_map(data, limits)
    version = body.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version != PROTOCOL_VERSION:
        # Never repr() the value: a list nested a thousand deep overflows the stack in repr.
        shown = version if isinstance(version, int | str) and len(str(version)) < 32 else type(version).__name__
        raise invalid(f"unsupported protocol version {shown!r}; this worker speaks {PROTOCOL_VERSION}")
    unknown = set(body) - _KNOWN_REQUEST_KEYS
    if unknown:
        raise invalid(f"unknown request fields: {sorted(map(str, unknown))}")
    request_id = _require_id(body, "id")
    client_id = _require_id(body, "client")
    reply = body.get("reply")
    if reply != keys.reply(client_id, request_id):
        raise invalid("reply must be the key this protocol derives from client and id")
    kind = _require_kind(body.get("kind"))
    conversation = _optional_conversation(body)
    append = body.get("append", False)
    if not isinstance(append, bool) or (append and conversation is None):
        raise invalid("append must be a boolean, and true only with a conversation")
    messages: tuple[ChatMessage, ...] = ()
    prompt = ""
    command = None
    if kind is RequestKind.CHAT:
        _forbid(body, kind, {"prompt", "op"})
        messages = _parse_messages(body.get("messages"), limits)
    elif kind is RequestKind.COMPLETION:
        _forbid(body, kind, {"messages", "op"})
        prompt = _require_text(body.get("prompt"), "prompt", limits.max_text_chars)
        if not prompt:
            raise invalid("prompt must not be empty")
    else:
        _forbid(body, kind, {"messages", "prompt", "append", "cache_salt"})
        command = parse_command(body)
        if conversation is None and command.op is not ConversationOp.LIST_STATES:
            raise invalid("an op request names its conversation")
    if kind is not RequestKind.OP and {"op", "to_message", "drop_tokens", "into"} & set(body):
        raise invalid("op, to_message, drop_tokens and into belong to op requests")
    return Request(
        id=request_id,
        client_id=client_id,
        kind=kind,
        messages=messages,
        prompt=prompt,
        params=_parse_params(body.get("params", {}), limits),
        deadline=_optional_time(body.get("deadline"), "deadline"),
        created=_optional_time(body.get("created"), "created") or 0.0,
        conversation=conversation,
        append=append,
        command=command,
        priority=_int_in(body.get("priority", 0), "priority", -MAX_PRIORITY, MAX_PRIORITY),
        tenant=_optional_tenant(body.get("tenant")),
        cache_salt=_optional_cache_salt(body.get("cache_salt")),
    )


def _forbid(body: Mapping[str, Any], kind: RequestKind, names: set[str]) -> None:
    present = sorted(names & set(body))
    if present:
        raise invalid(f"a {kind.value} request does not carry {', '.join(present)}")


def _optional_conversation(body: Mapping[str, Any]) -> str | None:
    value = body.get("conversation")
    if value is None:
        return None
    if not isinstance(value, str) or not is_valid_id(value):
        raise invalid("conversation must be 8 to 64 characters of [A-Za-z0-9_-]")
    return value


def _optional_tenant(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_valid_name(value):
        raise invalid("tenant must be 1 to 64 characters of [A-Za-z0-9_.-]")
    return value


def _optional_cache_salt(value: object) -> str | None:
    if value is None:
        return None
    salt = _require_text(value, "cache_salt", MAX_CACHE_SALT_CHARS)
    if not salt:
        raise invalid("cache_salt must not be empty")
    return salt


@dataclass(frozen=True)
class Sender:
    """Who sent an entry that failed validation, as far as the entry says: where to answer it, and the owner and
    member its enqueue counted it as (protocol/admission.py), so that the count is given back."""

    reply: str
    owner: str
    key: str
    """`<client>/<id>`, as Request.key."""


def identify_sender(data: bytes, keys: Keys, limits: Limits) -> Sender | None:
    """Best-effort sender of an entry that failed validation, so it still gets an error event and its slot back."""
    if len(data) > limits.max_entry_bytes:
        return None
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception:  # noqa: BLE001 - anything unparseable simply has no identity
        return None
    if not isinstance(body, Mapping):
        return None
    request_id, client_id, tenant = body.get("id"), body.get("client"), body.get("tenant")
    if (
        isinstance(request_id, str)
        and isinstance(client_id, str)
        and is_valid_id(request_id)
        and is_valid_id(client_id)
    ):
        # The owner as the client computed it, even from a tenant the worker refuses: it counted the request so.
        owner = owner_of(tenant if isinstance(tenant, str) else None, client_id)
        return Sender(keys.reply(client_id, request_id), owner, f"{client_id}/{request_id}")
    return None


def identify_request(data: bytes, keys: Keys, limits: Limits) -> str | None:
    """Best-effort reply key of an entry that failed validation, so its sender still gets an error event."""
    sender = identify_sender(data, keys, limits)
    return None if sender is None else sender.reply


def encode_event(event: Event) -> bytes:
    """Serialise an event to the bytes stored in its reply stream entry."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "n": event.n}
    if isinstance(event, TokenEvent):
        body.update(type="token", text=event.text, tokens=list(event.tokens))
    elif isinstance(event, ResultEvent):
        body.update(type="result", data=event.data)
    elif isinstance(event, DoneEvent):
        body.update(
            type="done",
            finish_reason=event.finish_reason.value,
            usage=asdict(event.usage),
            timings=asdict(event.timings),
        )
    else:
        body.update(type="error", code=event.code.value, message=event.message)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_event(data: bytes) -> Event:
    """Parse an event written by a worker."""
    try:
        body = msgpack.unpackb(data, raw=False)
        kind = body["type"]
        n = int(body["n"])
        if kind == "token":
            return TokenEvent(n=n, text=str(body["text"]), tokens=tuple(int(t) for t in body["tokens"]))
        if kind == "done":
            return DoneEvent(
                n=n,
                finish_reason=FinishReason(body["finish_reason"]),
                usage=Usage(**_known_fields(Usage, body["usage"])),
                timings=Timings(**_known_fields(Timings, body["timings"])),
            )
        if kind == "error":
            return ErrorEvent(n=n, code=_error_code(body["code"]), message=str(body["message"]))
        if kind == "result":
            return ResultEvent(n=n, data=dict(body["data"]))
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(ErrorCode.INTERNAL, f"malformed event from worker: {exc}") from exc
    raise ProtocolError(ErrorCode.INTERNAL, f"unknown event type {kind!r}")


def _known_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    # A newer worker may report more; an older client keeps what it knows.
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return {name: value for name, value in values.items() if name in names}


def _error_code(value: str) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        # A newer worker may add codes; an old client still gets a failure it can report.
        return ErrorCode.INTERNAL


def _unpack_map(data: bytes, limits: Limits) -> dict[str, Any]:
    if len(data) > limits.max_entry_bytes:
        raise invalid(f"entry of {len(data)} bytes exceeds the limit of {limits.max_entry_bytes}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise invalid(f"entry is not valid msgpack: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise invalid("entry must be a msgpack map")
    return body


def _require_id(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not is_valid_id(value):
        raise invalid(f"{name} must be 8 to 64 characters of [A-Za-z0-9_-]")
    return value


def _require_kind(value: object) -> RequestKind:
    try:
        return RequestKind(str(value)) if isinstance(value, str) else RequestKind("")
    except ValueError:
        raise invalid(f"kind must be one of {[k.value for k in RequestKind]}") from None


def _require_text(value: object, name: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string")
    if len(value) > max_chars:
        raise invalid(f"{name} has {len(value)} characters; the limit is {max_chars}")
    if "\x00" in value:
        raise invalid(f"{name} must not contain NUL characters")
    return value


def _parse_messages(value: object, limits: Limits) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list")
    if len(value) > limits.max_messages:
        raise invalid(f"{len(value)} messages exceed the limit of {limits.max_messages}")
    messages = []
    total = 0
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"role", "content"}:
            raise invalid(f"messages[{i}] must be a map of role and content")
        role = _require_text(item.get("role"), f"messages[{i}].role", limits.max_role_chars)
        if not role:
            raise invalid(f"messages[{i}].role must not be empty")
        content = _require_text(item.get("content"), f"messages[{i}].content", limits.max_text_chars)
        total += len(content)
        messages.append(ChatMessage(role=role, content=content))
    if total > limits.max_text_chars:
        raise invalid(f"messages hold {total} characters; the limit is {limits.max_text_chars}")
    return tuple(messages)


def _params_to_wire(params: SamplingParams) -> dict[str, Any]:
    wire = asdict(params)
    wire["stop"] = list(params.stop)
    if not params.ignore_eos:
        del wire["ignore_eos"]  # workers older than the field refuse it; false is its default anyway
    return {k: v for k, v in wire.items() if v is not None}


def _parse_params(value: object, limits: Limits) -> SamplingParams:
    if not isinstance(value, dict):
        raise invalid("params must be a map")
    unknown = set(value) - _PARAM_NAMES
    if unknown:
        raise invalid(f"unknown sampling params: {sorted(map(str, unknown))}")
    defaults = SamplingParams()
    max_tokens = value.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _int_in(max_tokens, "max_tokens", 1, limits.max_tokens)
    seed = value.get("seed")
    if seed is not None:
        seed = _int_in(seed, "seed", 0, 2**32 - 2)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float_in(value.get("temperature", defaults.temperature), "temperature", 0.0, 100.0),
        top_k=_int_in(value.get("top_k", defaults.top_k), "top_k", 0, 1 << 20),
        top_p=_float_in(value.get("top_p", defaults.top_p), "top_p", 0.0, 1.0),
        min_p=_float_in(value.get("min_p", defaults.min_p), "min_p", 0.0, 1.0),
        seed=seed,
        stop=_parse_stop(value.get("stop", []), limits),
        repeat_penalty=_float_in(value.get("repeat_penalty", 1.0), "repeat_penalty", 0.0, 10.0),
        frequency_penalty=_float_in(value.get("frequency_penalty", 0.0), "frequency_penalty", -2.0, 2.0),
        presence_penalty=_float_in(value.get("presence_penalty", 0.0), "presence_penalty", -2.0, 2.0),
        repeat_last_n=_int_in(value.get("repeat_last_n", defaults.repeat_last_n), "repeat_last_n", 0, 4096),
        ignore_eos=_bool(value.get("ignore_eos", False), "ignore_eos"),
    )


def _parse_stop(value: object, limits: Limits) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > limits.max_stop_strings:
        raise invalid(f"stop must be a string or a list of at most {limits.max_stop_strings} strings")
    stops = tuple(_require_text(s, "stop", limits.max_stop_chars) for s in value)
    if any(not s for s in stops):
        raise invalid("stop strings must not be empty")
    return stops


def _int_in(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{name} must be an integer in [{low}, {high}]")
    return value


def _float_in(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise invalid(f"{name} must be in [{low}, {high}]")
    return number


def _optional_time(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise invalid(f"{name} must be a non-negative Unix time in seconds")
    return float(value)


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false")
    return value
