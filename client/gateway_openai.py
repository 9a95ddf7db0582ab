"""OpenAI request bodies -> queue requests: what a call asks for, checked for types, and the errors it may get.

Only types and the gateway's own rules are checked here; ranges and limits stay the worker's (it answers
`invalid_request`, which becomes a 400 all the same), so a worker started with other limits is not second-guessed.
Every problem is an `ApiError` carrying the OpenAI error object and its HTTP status: a malformed body is a 400,
never a 500.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from llamaq.protocol import ChatMessage, ErrorCode, is_valid_id

from .errors import RequestFailed
from .options import RequestOptions

CONVERSATION_HEADER = "X-Conversation-Id"
MAX_CHOICES = 16
"""Most choices (n, times prompts for /v1/completions) one call may ask for: each is a request of its own."""
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions (chat has none: the rest of the window)."""

_INT64 = 1 << 63
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# llamaq error code -> HTTP status and OpenAI error type.
_FAILURES: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    # Only a worker that shut down without finishing sends `cancelled` to a caller that did not ask for it.
    ErrorCode.CANCELLED: (503, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


class Endpoint(StrEnum):
    """The two generation endpoints."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}} with its status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON object OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a request the gateway refuses before it reaches the queue."""
    return ApiError(400, message, param=param, code=code)


def failure_error(failure: RequestFailed) -> ApiError:
    """The HTTP answer to a request that failed in the queue or on the worker."""
    status, error_type = _FAILURES.get(failure.code, _FAILURES[ErrorCode.INTERNAL])
    headers = {"Retry-After": "1"} if failure.code is ErrorCode.OVERLOADED else None
    return ApiError(status, failure.message, type=error_type, code=failure.code.value, headers=headers)


@dataclass(frozen=True)
class Call:
    """One OpenAI call in the queue's terms: the prompt(s), how many choices each, and the request options."""

    endpoint: Endpoint
    model: str | None
    messages: tuple[ChatMessage, ...] | None
    prompts: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    options: RequestOptions = field(default_factory=lambda: RequestOptions())
    user: str | None = None

    @property
    def n_choices(self) -> int:
        """Requests this call becomes: n per prompt."""
        return self.n * (1 if self.messages is not None else len(self.prompts))


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; 400 for anything else."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON and bad UTF-8; RecursionError a body nested thousands of levels deep.
        raise invalid(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


def parse_call(endpoint: Endpoint, body: dict[str, Any], headers: Mapping[str, str]) -> Call:
    """The call a chat or completions body describes; ApiError (400) when it cannot be served."""
    _refuse_unsupported(endpoint, body)
    if endpoint is Endpoint.CHAT:
        messages: tuple[ChatMessage, ...] | None = _messages(body.get("messages"))
        prompts: tuple[str, ...] = ()
    else:
        messages, prompts = None, _prompts(body.get("prompt"))
    n = _int(body, "n", 1)
    assert n is not None
    if n < 1:
        raise invalid("n must be at least 1", "n")
    stream = bool(_bool(body, "stream", False))
    call = Call(
        endpoint=endpoint,
        model=_str(body, "model"),
        messages=messages,
        prompts=prompts,
        n=n,
        stream=stream,
        include_usage=stream and _include_usage(body.get("stream_options")),
        options=_options(endpoint, body, headers),
        user=_str(body, "user"),
    )
    if call.n_choices > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices per call (n times the number of prompts)", "n")
    if call.options.get("conversation") and call.n_choices > 1:
        raise invalid("a conversation turn has one choice: n must be 1 and the prompt one string", "n")
    return call


def tenant_of_user(user: str | None) -> str | None:
    """A fairness key from OpenAI's `user` field: itself when it is a valid tenant name, else a digest of it."""
    if not user:
        return None
    # fullmatch: match() with `$` accepts a name followed by a newline, which the worker then refuses (a 400).
    return user if _TENANT.fullmatch(user) else "u-" + hashlib.sha256(user.encode()).hexdigest()[:16]


def _options(endpoint: Endpoint, body: dict[str, Any], headers: Mapping[str, str]) -> RequestOptions:
    options = RequestOptions()
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is None and endpoint is Endpoint.COMPLETIONS:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repeat_penalty"):
        value = _number(body, name)
        if value is not None:
            options[name] = value
    for name in ("top_k", "seed", "repeat_last_n"):
        count = _int(body, name)
        if count is not None:
            options[name] = count  # type: ignore[literal-required]
    if _bool(body, "ignore_eos", False):
        options["ignore_eos"] = True
    stop = _stop(body.get("stop"))
    if stop:
        options["stop"] = stop
    timeout = _number(body, "timeout")
    if timeout is not None:
        if timeout <= 0:
            raise invalid("timeout must be a positive number of seconds", "timeout")
        options["deadline_s"] = timeout
    _add_cache_options(options, body, headers)
    return options


def _add_cache_options(options: RequestOptions, body: dict[str, Any], headers: Mapping[str, str]) -> None:
    """What the worker keeps for the call: a cache salt (vLLM's field), a conversation id."""
    cache_salt = _str(body, "cache_salt")
    if cache_salt is not None:
        options["cache_salt"] = cache_salt
    conversation = _conversation(body, headers)
    if conversation is not None:
        # OpenAI clients resend the whole history every turn: the worker finds the KV by the id, not by appending.
        options["conversation"] = conversation


def _conversation(body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
    in_body = _str(body, "conversation")
    in_header = headers.get(CONVERSATION_HEADER) or None
    if in_body and in_header and in_body != in_header:
        raise invalid(f"the conversation field and the {CONVERSATION_HEADER} header differ", "conversation")
    conversation = in_body or in_header
    if conversation is not None and not is_valid_id(conversation):
        raise invalid("a conversation id is 8 to 64 characters of [A-Za-z0-9_-]", "conversation")
    return conversation


def _refuse_unsupported(endpoint: Endpoint, body: dict[str, Any]) -> None:
    """Features whose silent absence would give a wrong answer are refused; unknown fields are ignored."""
    unsupported = {
        "tools": "tool calls",
        "functions": "function calls",
        "logit_bias": "logit_bias",
        "suffix": "suffix (insertion)",
    }
    for name, feature in unsupported.items():
        if body.get(name):
            raise invalid(f"{feature} are not supported by this server", name)
    if body.get("logprobs") not in (None, False, 0):
        raise invalid("logprobs are not supported by this server", "logprobs")
    if body.get("echo"):
        raise invalid("echo is not supported by this server", "echo")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of is not supported by this server", "best_of")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise invalid("only the text response_format is supported", "response_format")


def _messages(value: object) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array", "messages")
    messages = []
    for index, message in enumerate(value):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{param} must be an object", param)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"{param}.role must be a non-empty string", f"{param}.role")
        # Newer OpenAI clients say `developer` for what chat templates know as `system`.
        role = "system" if role == "developer" else role
        messages.append(ChatMessage(role=role, content=_content(message.get("content"), f"{param}.content")))
    return tuple(messages)


def _content(value: object, param: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{param}: only text content parts are supported", param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{param} must be a string or an array of text parts", param)


def _prompts(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise invalid("prompt must be a string or a non-empty array of strings (token arrays are not supported)", "prompt")


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise invalid("stop must be a string or an array of strings", "stop")


def _include_usage(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise invalid("stream_options must be an object", "stream_options")
    return bool(_bool(value, "include_usage", False))


def _int(body: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, never in JSON's sense; the bound keeps msgpack from overflowing.
    if isinstance(value, bool) or not isinstance(value, int) or not -_INT64 <= value < _INT64:
        raise invalid(f"{name} must be an integer", name)
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, int) and abs(value) > 1e300):
        raise invalid(f"{name} must be a number", name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false", name)
    return value


def _str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string", name)
    return value
