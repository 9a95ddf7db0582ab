"""KV cache bookkeeping: which sequence ids are free, running or idle, and which tokens each idle one holds.

Pure data, no llama.cpp: the engine loop carries out what this decides. A finished request's sequence is not
cleared but parked as idle with the tokens whose KV it holds, so a later request that starts with the same
tokens (the next turn of a chat, a shared system prompt) reuses them and computes only the rest. Idle
sequences are evicted least recently used first when an id is needed.

Ids come from a pool below n_seq_max because a larger id aborts the whole process in llama.cpp's per-sequence
layout.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from itertools import count


@dataclass(frozen=True)
class Allocation:
    """A sequence id for a new request, and how many of its first tokens are already in that sequence's KV.

    The engine must remove the sequence's cells from position `n_cached` on before decoding into it.
    """

    seq_id: int
    n_cached: int


@dataclass
class _Idle:
    tokens: list[int]
    last_used: int


@dataclass
class KvCache:
    """Sequence id pool, per-sequence window and the prefix cache of idle sequences of one llama.cpp context."""

    n_seq_max: int
    window: int
    """Cells one sequence may occupy; prompt plus generated tokens must fit in it."""
    prefix_cache: bool = True
    """Park finished sequences for reuse; when off, every released sequence is cleared."""
    _free: list[int] = field(init=False)
    _idle: dict[int, _Idle] = field(init=False, default_factory=dict)
    _running: set[int] = field(init=False, default_factory=set)
    _clock: count[int] = field(init=False, default_factory=count)

    def __post_init__(self) -> None:
        # Lowest ids first, so a lightly loaded worker touches few streams.
        self._free = list(range(self.n_seq_max - 1, -1, -1))

    @property
    def n_free(self) -> int:
        """Ids a new request can get now: free ones and idle ones that may be evicted."""
        return len(self._free) + len(self._idle)

    @property
    def n_used(self) -> int:
        """Ids held by running sequences."""
        return len(self._running)

    @property
    def n_idle(self) -> int:
        """Ids held by idle sequences kept for their prefix."""
        return len(self._idle)

    def cells_held(self) -> dict[int, int]:
        """Cells each idle sequence holds, by sequence id (running ones are counted by their owners)."""
        return {seq_id: len(idle.tokens) for seq_id, idle in self._idle.items()}

    def fits(self, n_prompt: int, max_tokens: int) -> bool:
        """True when a prompt and the tokens it may generate fit in one sequence's window."""
        return n_prompt + max_tokens <= self.window

    def admit(self, prompt: SequenceOf[int]) -> Allocation | None:
        """An id for a request with this prompt: the idle sequence sharing the longest prefix, else a free id,
        else the least recently used idle one; None when every id runs."""
        best_id, best_len = None, 0
        for seq_id, idle in self._idle.items():
            shared = common_prefix_length(idle.tokens, prompt)
            if shared > best_len:
                best_id, best_len = seq_id, shared
        if best_id is not None:
            del self._idle[best_id]
            # At least the last prompt token is computed again: its logits give the first new token.
            return self._run(best_id, min(best_len, len(prompt) - 1))
        if self._free:
            return self._run(self._free.pop(), 0)
        if self._idle:
            oldest = min(self._idle, key=lambda seq_id: self._idle[seq_id].last_used)
            del self._idle[oldest]
            return self._run(oldest, 0)
        return None

    def park(self, seq_id: int, tokens: SequenceOf[int]) -> bool:
        """A running sequence ended with `tokens` in its KV; keep it for reuse. False: clear it and free()."""
        self._check_running(seq_id)
        if not self.prefix_cache or not tokens:
            return False
        self._running.discard(seq_id)
        self._idle[seq_id] = _Idle(list(tokens), next(self._clock))
        return True

    def free(self, seq_id: int) -> None:
        """Return a running sequence's id to the pool; its cells must already be cleared."""
        self._check_running(seq_id)
        self._running.discard(seq_id)
        self._free.append(seq_id)

    def _run(self, seq_id: int, n_cached: int) -> Allocation:
        self._running.add(seq_id)
        return Allocation(seq_id, max(n_cached, 0))

    def _check_running(self, seq_id: int) -> None:
        if seq_id not in self._running:
            raise ValueError(f"sequence id {seq_id} is not running")


def common_prefix_length(a: SequenceOf[int], b: SequenceOf[int]) -> int:
    """Number of leading tokens two token lists share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
