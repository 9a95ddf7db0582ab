"""KV cache bookkeeping: which sequence ids are in use and how many cells each sequence may hold.

Pure data, no llama.cpp: the engine executes what this decides. Ids come from a pool below n_seq_max because a
larger id aborts the whole process in llama.cpp's per-sequence layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KvCache:
    """Sequence id pool and per-sequence window of one llama.cpp context."""

    n_seq_max: int
    window: int
    """Cells one sequence may occupy; prompt plus generated tokens must fit in it."""
    _free: list[int] = field(init=False)

    def __post_init__(self) -> None:
        # Lowest ids first, so a lightly loaded worker touches few streams.
        self._free = list(range(self.n_seq_max - 1, -1, -1))

    @property
    def n_free(self) -> int:
        """Sequence ids available now."""
        return len(self._free)

    @property
    def n_used(self) -> int:
        """Sequence ids held by live sequences."""
        return self.n_seq_max - len(self._free)

    def allocate(self) -> int | None:
        """A free sequence id, or None when every id is in use."""
        return self._free.pop() if self._free else None

    def free(self, seq_id: int) -> None:
        """Return a sequence id to the pool; its cells must already be cleared."""
        if not 0 <= seq_id < self.n_seq_max or seq_id in self._free:
            raise ValueError(f"sequence id {seq_id} is not allocated")
        self._free.append(seq_id)

    def fits(self, n_prompt: int, max_tokens: int) -> bool:
        """True when a prompt and the tokens it may generate fit in one sequence's window."""
        return n_prompt + max_tokens <= self.window
