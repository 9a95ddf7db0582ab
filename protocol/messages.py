"""Request and event types: plain, immutable data shared by clients and workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from .errors import ErrorCode

PROTOCOL_VERSION = 1


class RequestKind(StrEnum):
    """What a request carries: a chat to render with the model's template, raw text, or an operation on a
    stored conversation."""

    CHAT = "chat"
    COMPLETION = "completion"
    OP = "op"


class FinishReason(StrEnum):
    """Why a generation ended without an error."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat."""

    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults are llama-server's; temperature 0 means greedy."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    ignore_eos: bool = False
    """Never end at an end-of-generation token (they are left out of sampling, as llama-server's ignore_eos):
    the answer runs to max_tokens or a stop string. For benchmarks and load tests."""

    @property
    def greedy(self) -> bool:
        """True when the argmax token is taken at every step."""
        return self.temperature <= 0.0


class ConversationOp(StrEnum):
    """What an `op` request does to a conversation."""

    GET = "get"
    REWIND = "rewind"
    DELETE = "delete"
    FORK = "fork"
    SAVE_STATE = "save_state"
    """Write the conversation's KV to the worker's state directory, kept until deleted."""
    LOAD_STATE = "load_state"
    """Load the conversation's saved KV from the state directory into the worker's cache, verified."""
    LIST_STATES = "list_states"
    """List the state directory (the only op that names no conversation)."""
    DELETE_STATE = "delete_state"
    """Delete the conversation's state files (its history stays)."""


STATE_OPS = frozenset(
    {ConversationOp.SAVE_STATE, ConversationOp.LOAD_STATE, ConversationOp.LIST_STATES, ConversationOp.DELETE_STATE}
)
"""Operations on saved KV states, carried out by the worker's engine rather than on Redis."""


class PrefixSource(StrEnum):
    """Where the KV of a request's cached prompt tokens came from."""

    NONE = "none"
    """Nothing was cached: the whole prompt was computed."""
    CACHE = "cache"
    """The worker's live KV cache (a conversation's own sequence, or a shared prefix)."""
    DISK = "disk"
    """A state file restored from the state directory and verified."""
    RECOMPUTE = "recompute"
    """A saved state matched, but computing the prefix was cheaper, or the file was refused or failed its check."""


@dataclass(frozen=True)
class ConversationCommand:
    """An operation on a stored conversation, carried by a request of kind `op`."""

    op: ConversationOp
    to_message: int | None = None
    """rewind: keep the first `to_message` messages of a chat."""
    drop_tokens: int | None = None
    """rewind: drop the last `drop_tokens` tokens of a completion conversation."""
    into: str | None = None
    """fork: the id of the new conversation, which starts as a copy of this one."""


@dataclass(frozen=True)
class Request:
    """One generation request as it travels on the request stream."""

    id: str
    client_id: str
    kind: RequestKind
    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None
    """Absolute Unix time in seconds after which the request is worthless to the client."""
    created: float = 0.0
    """Unix time in seconds at which the client sent the request."""
    conversation: str | None = None
    """A named conversation: the worker keeps its history in Redis and its KV between turns."""
    append: bool = False
    """With a conversation: messages (or prompt) continue the stored history instead of repeating it."""
    command: ConversationCommand | None = None
    """Kind `op` only: what to do to the conversation."""
    priority: int = 0
    """Higher is served first under contention, and preempted last; -100 to 100."""
    tenant: str | None = None
    """Who the request is for (a user, a team, an API key): a worker shares its sequences fairly between tenants,
    and keeps each tenant's conversations and cached prompts to itself."""
    cache_salt: str | None = None
    """Narrows prefix-cache reuse further: only requests of the same owner and the same salt share KV."""

    @property
    def key(self) -> str:
        """This request's identity inside a worker: clients choose ids, so only client and id together are unique."""
        return f"{self.client_id}/{self.id}"

    @cached_property
    def owner(self) -> str:
        """Whose the request is: `t.<tenant>`, else `c.<client id>`. Its conversations, saved states, cached
        prompts and per-tenant limits belong to this owner."""
        return owner_of(self.tenant, self.client_id)

    @cached_property
    def cache_domain(self) -> str:
        """Requests reuse each other's KV only within one domain: the owner, narrowed by the cache salt."""
        return self.owner if self.cache_salt is None else f"{self.owner}/{self.cache_salt}"

    @cached_property
    def owned_conversation(self) -> str | None:
        """The conversation as the worker stores it: `<owner>/<conversation>`, so each owner has its own ids."""
        return None if self.conversation is None else owned_conversation(self.owner, self.conversation)


def owner_of(tenant: str | None, client_id: str) -> str:
    """The owner of a request from its tenant and client: the tenant when there is one, else the client."""
    return f"t.{tenant}" if tenant is not None else f"c.{client_id}"


def owned_conversation(owner: str, conversation: str) -> str:
    """A conversation id qualified by its owner: two owners naming one id have two conversations."""
    return f"{owner}/{conversation}"


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV was reused, not computed (restored ones included)."""
    restored_tokens: int = 0
    """Of cached_tokens, those restored from a state file."""
    prefix_source: str = PrefixSource.NONE.value
    """A PrefixSource value: which path brought the cached prefix."""


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in milliseconds."""

    queue_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float
    total_ms: float
    restore_ms: float = 0.0
    """Time spent loading and verifying a saved state for this request (part of queue_ms)."""


@dataclass(frozen=True)
class TokenEvent:
    """Text of the tokens sampled in one step; text may be empty while a stop string or UTF-8 sequence is pending.

    The last token event of a request may carry no tokens: it releases text held back until the end.
    """

    n: int
    text: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class DoneEvent:
    """The final event of a request that ended without an error."""

    n: int
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class ErrorEvent:
    """The final event of a request that failed."""

    n: int
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class ResultEvent:
    """The final event of an `op` request: what the conversation holds after the operation."""

    n: int
    data: dict[str, Any]


Event = TokenEvent | DoneEvent | ErrorEvent | ResultEvent
FinalEvent = DoneEvent | ErrorEvent | ResultEvent
