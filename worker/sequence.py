"""One request's life inside the worker: its tokens, how many are in the KV cache, its output so far."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

from llamaq.protocol import PrefixSource, Request

from .engine import SamplerHandle
from .text_stream import TextStream


class Status(Enum):
    """Where a sequence is in its life."""

    WAITING = auto()
    """Tokenized and queued; holds no sequence id yet."""
    RUNNING = auto()
    """Holds a sequence id; prefilling its prompt or decoding."""
    FINISHED = auto()


@dataclass
class Sequence:
    """A request being served: prompt plus generated tokens, of which `n_computed` are in the KV cache."""

    request: Request
    prompt_tokens: list[int]
    max_tokens: int
    received_at: float
    """time.monotonic() when the worker read the request from Redis."""
    generated: list[int] = field(default_factory=list)
    n_computed: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV was found in the cache at admission, not computed for this request."""
    seq_id: int | None = None
    copy_from: int | None = None
    """At admission: the sequence whose KV holds this one's cached prefix, to be copied in first."""
    sampler: SamplerHandle | None = None
    status: Status = Status.WAITING
    text: TextStream = field(default_factory=TextStream)
    reply: list[str] = field(default_factory=list)
    """Every text delta sent to the client, in order."""
    next_event: int = 0
    arrival: int = 0
    """Order in which the scheduler first queued it; kept through preemptions, so those go first again."""
    preemptions: int = 0
    """Times the sequence lost its KV to make room and went back to the queue to be recomputed."""
    admitted_at: float | None = None
    first_token_at: float | None = None
    restore_checked: bool = False
    """The state directory was consulted for this sequence's conversation."""
    restored_into: int | None = None
    """The sequence id a saved state of its conversation was restored into, waiting for it to be admitted."""
    restored_tokens: int = 0
    """Of cached_tokens, those whose KV came from a state file."""
    restore_ms: float = 0.0
    prefix_source: PrefixSource = PrefixSource.NONE
    """Set by a restore attempt; otherwise decided from cached_tokens at the end."""
    last_token_at: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    """Seconds between consecutive sampled tokens (inter-token latency)."""

    @property
    def key(self) -> str:
        """The request's identity in this worker (client and request id)."""
        return self.request.key

    @property
    def n_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_tokens) + len(self.generated)

    @property
    def n_pending(self) -> int:
        """Tokens not yet in the KV cache: the rest of the prompt, or the last sampled token."""
        return self.n_tokens - self.n_computed

    @property
    def prefilling(self) -> bool:
        """True while more than the last sampled token remains to be computed: the prompt, or after a
        preemption everything the sequence had."""
        return self.n_computed < self.n_tokens - 1

    def all_tokens(self) -> list[int]:
        """Prompt plus generated tokens: what the sequence's KV must hold to go on."""
        return self.prompt_tokens + self.generated

    def computed_tokens(self) -> list[int]:
        """The tokens whose KV this sequence holds, in position order."""
        return self.all_tokens()[: self.n_computed]

    def pending_tokens(self, limit: int) -> list[int]:
        """Up to `limit` of the next tokens to feed to the model."""
        start = self.n_computed
        end = min(self.n_tokens, start + limit)
        prompt_len = len(self.prompt_tokens)
        if end <= prompt_len:
            return self.prompt_tokens[start:end]
        return (self.prompt_tokens[start:] + self.generated[max(0, start - prompt_len) :])[: end - start]

    def take_event_number(self) -> int:
        """The number of the next event of this request; events are numbered 0, 1, 2... in order."""
        n = self.next_event
        self.next_event += 1
        return n

    def expired(self, now_unix: float) -> bool:
        """True once the request's deadline has passed."""
        return self.request.deadline is not None and now_unix >= self.request.deadline

    def mark_token(self) -> None:
        """Record when a token was sampled: the first for time to first token, the others' gaps."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        elif self.last_token_at is not None:
            self.inter_token_s.append(now - self.last_token_at)
        self.last_token_at = now
