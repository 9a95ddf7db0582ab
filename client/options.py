"""What a caller may pass with a request: sampling keywords, a deadline, chat messages, and the Redis URL."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, TypedDict

from llamaq.protocol import ChatMessage, SamplingParams

MessageLike: TypeAlias = ChatMessage | Mapping[str, str]


class SamplingKwargs(TypedDict, total=False):
    """Keyword form of `SamplingParams`; `stop` may also be one string or any sequence."""

    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    stop: str | Sequence[str]
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    repeat_last_n: int
    ignore_eos: bool


class RequestOptions(SamplingKwargs, total=False):
    """Sampling keywords plus `deadline_s`, seconds from now after which the answer is worthless, and a named
    `conversation` (with `append`: the messages or prompt continue its stored history)."""

    deadline_s: float | None
    conversation: str | None
    append: bool
    priority: int
    """-100 to 100: higher is served first under contention and preempted last."""
    tenant: str | None
    """Who the request is for: the worker shares its sequences fairly between tenants and keeps each tenant's
    conversations and cached prompts to itself. Default: the client's own `tenant`, else none (the client id)."""
    cache_salt: str | None
    """Prefix-cache reuse only with requests of the same owner and this same salt (vLLM's `cache_salt`)."""
    wait_if_overloaded: bool
    """When the queue's backlog is full, wait for room (up to deadline_s) instead of failing with overloaded."""


def sampling_params(options: Mapping[str, Any]) -> tuple[SamplingParams, float | None]:
    """Split keyword options into SamplingParams and deadline_s; TypeError on an unknown name."""
    values = dict(options)
    deadline_s = values.pop("deadline_s", None)
    for name in ("conversation", "append", "priority", "tenant", "cache_salt", "wait_if_overloaded"):
        values.pop(name, None)
    stop = values.pop("stop", None)
    if stop is not None:
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(**values), deadline_s


def chat_message(message: MessageLike) -> ChatMessage:
    """A ChatMessage from itself or from a {"role", "content"} mapping."""
    if isinstance(message, ChatMessage):
        return message
    try:
        return ChatMessage(role=message["role"], content=message["content"])
    except KeyError as exc:
        raise TypeError(f"a chat message needs role and content, got {sorted(message)}") from exc


def resolve_url(url: str | None) -> str:
    """The given Redis URL, else $REDIS_URL; raise ValueError when there is neither."""
    resolved = url or os.environ.get("REDIS_URL")
    if not resolved:
        raise ValueError("no Redis URL: pass one or set REDIS_URL")
    return resolved
