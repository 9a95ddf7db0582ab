"""Request and event types: plain, immutable data shared by clients and workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .errors import ErrorCode

PROTOCOL_VERSION = 1


class RequestKind(StrEnum):
    """What the prompt of a request is: a chat to render with the model's template, or raw text."""

    CHAT = "chat"
    COMPLETION = "completion"


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

    @property
    def greedy(self) -> bool:
        """True when the argmax token is taken at every step."""
        return self.temperature <= 0.0


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

    @property
    def key(self) -> str:
        """This request's identity inside a worker: clients choose ids, so only client and id together are unique."""
        return f"{self.client_id}/{self.id}"


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in milliseconds."""

    queue_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float
    total_ms: float


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


Event = TokenEvent | DoneEvent | ErrorEvent
FinalEvent = DoneEvent | ErrorEvent
