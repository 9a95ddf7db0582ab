"""KV cache bookkeeping: which sequence ids are free, running or idle, and which tokens each idle one holds.

Pure data, no llama.cpp: the engine loop carries out what this decides. A finished request's sequence is not
cleared but parked as idle with the tokens whose KV it holds, so a later request that starts with the same
tokens (the next turn of a chat, a shared system prompt) reuses them and computes only the rest. Idle
sequences are evicted least recently used first when an id is needed.

Ids come from a pool below n_seq_max because a larger id aborts the whole process in llama.cpp's per-sequence
layout.

Reuse stays inside a cache domain (a tenant, or a client, narrowed by a cache salt): a sequence is matched only
against the idle sequences of its own domain, and the caller passes only that domain's running ones. Another
tenant's prompt is then never reused for a request, and so never shows in its `cached_tokens` or its timing.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from itertools import count

from .cell_ledger import CellLedger
from .id_packing import Relocation, plan_packing

MIN_COPY_TOKENS = 16
"""Shortest shared prefix worth copying from another sequence (a copy moves a whole KV stream)."""


@dataclass(frozen=True)
class Allocation:
    """A sequence id for a new request, and how many of its first tokens are already in that sequence's KV.

    With `copy_from`, the engine first copies that sequence's KV into `seq_id`. Either way it then removes the
    sequence's cells from position `n_cached` on before decoding into it.
    """

    seq_id: int
    n_cached: int
    copy_from: int | None = None


@dataclass(frozen=True)
class Evicted:
    """An idle sequence evicted to make room: its cells still hold `tokens` until the engine clears them."""

    seq_id: int
    tokens: list[int]
    owner: str | None
    domain: str | None = None
    """The cache domain of the request that computed it."""


@dataclass
class _Idle:
    tokens: list[int]
    last_used: int
    owner: str | None
    """The named conversation whose KV this is, if any."""
    domain: str | None = None
    """Only requests of this cache domain may reuse it (None: the domain of callers that name none)."""


@dataclass
class KvCache:
    """Sequence id pool, per-sequence window and the prefix cache of idle sequences of one llama.cpp context."""

    n_seq_max: int
    window: int
    """Cells one sequence may occupy; prompt plus generated tokens must fit in it."""
    prefix_cache: bool = True
    """Reuse prefixes: park finished sequences, continue or copy them. When off, every request is computed
    from scratch and every released sequence is cleared."""
    n_cells: int | None = None
    """Unified layout: the cells all sequences share, counted by the ledger. None: each sequence owns a stream
    of `window` cells, so cells never run out while ids last."""
    ledger: CellLedger = field(init=False, default_factory=CellLedger)
    _free: list[int] = field(init=False)
    _evicted: list[Evicted] = field(init=False, default_factory=list)
    _displaced: list[Evicted] = field(init=False, default_factory=list)
    _idle: dict[int, _Idle] = field(init=False, default_factory=dict)
    _running: set[int] = field(init=False, default_factory=set)
    _copies: dict[int, int] = field(init=False, default_factory=dict)
    """This round's copies, target id -> source id. The engine clears a round's evicted ids before it copies, so a
    source must keep its cells (neither evicted nor preempted) until end_round."""
    _clock: count[int] = field(init=False, default_factory=count)
    evictions: int = field(init=False, default=0)
    """Idle sequences evicted to make room (least recently used, or all after a failed decode)."""

    def __post_init__(self) -> None:
        self._free = list(range(self.n_seq_max))

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

    def cells_in_use(self) -> int:
        """Cells all sequences hold (unified layout), shared cells counted once."""
        return self.ledger.cells_in_use()

    def room(self) -> int | None:
        """Cells still free in the unified layout; None in the per-sequence layout."""
        return None if self.n_cells is None else self.n_cells - self.ledger.cells_in_use()

    def resize(self, seq_id: int, length: int) -> None:
        """A running sequence now holds `length` positions."""
        self._check_running(seq_id)
        self.ledger.resize(seq_id, length)

    def take_evicted(self) -> list[Evicted]:
        """Sequences evicted by evict_lru since the last call: the caller may save a conversation's KV, then
        must clear their cells before decoding."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def take_displaced(self) -> list[Evicted]:
        """Idle conversations whose id admit() gave to another request since the last call: their cells still
        hold their tokens until the engine cuts them back for the new owner (a chance to save them first)."""
        displaced, self._displaced = self._displaced, []
        return displaced

    def end_round(self) -> None:
        """The engine is about to carry out this round's admissions: the sources of their copies may go again."""
        self._copies.clear()

    def copy_sources(self) -> set[int]:
        """Ids whose KV an admission of this round is to copy."""
        return set(self._copies.values())

    def is_copy_source(self, seq_id: int) -> bool:
        """True while an admission of this round is to copy this sequence's KV."""
        return seq_id in self._copies.values()

    def evict_lru(self, keep: int | None = None) -> int | None:
        """Evict the least recently used idle sequence other than `keep` and this round's copy sources; its id
        (also kept for take_evicted)."""
        evictable = [seq_id for seq_id in self._idle if seq_id != keep and not self.is_copy_source(seq_id)]
        if not evictable:
            return None
        oldest = min(evictable, key=lambda seq_id: self._idle[seq_id].last_used)
        idle = self._idle.pop(oldest)
        self.evictions += 1
        self.ledger.drop(oldest)
        self._free.append(oldest)
        self._evicted.append(Evicted(oldest, idle.tokens, idle.owner, idle.domain))
        return oldest

    def fits(self, n_prompt: int, max_tokens: int) -> bool:
        """True when a prompt and the tokens it may generate fit in one sequence's window."""
        return n_prompt + max_tokens <= self.window

    def admit(
        self,
        prompt: SequenceOf[int],
        running: Mapping[int, SequenceOf[int]] | None = None,
        owner: str | None = None,
        domain: str | None = None,
    ) -> Allocation | None:
        """An id for a request with this prompt, reusing the longest prefix any sequence of its cache `domain`
        holds; None when every id runs. `running` maps the domain's running sequence ids to the tokens they
        have computed; `owner` names the request's conversation.

        A conversation's own idle sequence (or an anonymous one it extends) is continued in place. A prefix
        shared with another sequence (a system prompt, a branch) is copied into a fresh id when there is one,
        so the source keeps its history; otherwise an idle source is taken over and cut back.
        """
        source, shared = self._longest_prefix(prompt, running or {}, domain) if self.prefix_cache else (None, 0)
        # At least the last prompt token is computed again: its logits give the first new token.
        n_cached = min(shared, len(prompt) - 1)
        if not self._make_room(len(prompt) - max(n_cached, 0), keep=source):
            if source is None or source not in self._idle:
                return None  # running sequences hold the cells; they come back as those finish
            # Only the idle source of the prefix stands in the way: drop it and compute everything.
            source, shared, n_cached = None, 0, 0
            if not self._make_room(len(prompt), keep=None):
                return None
        if source is not None and source in self._idle and self._continues(self._idle[source], shared, owner):
            del self._idle[source]
            return self._run(source, n_cached)
        if source is not None and shared >= MIN_COPY_TOKENS:
            fresh = self._fresh_id(keep=source)
            if fresh is not None:
                return self._run(fresh, n_cached, copy_from=source)
        if source is not None and source in self._idle:
            idle = self._idle[source]
            foreign = idle.owner not in (None, owner)
            # Another conversation's KV is not cut back for a few shared tokens while an id is free.
            if not (foreign and shared < MIN_COPY_TOKENS and self._free):
                del self._idle[source]
                if foreign:
                    self._displaced.append(Evicted(source, idle.tokens, idle.owner, idle.domain))
                return self._run(source, n_cached)
        fresh = self._fresh_id(keep=None)
        return None if fresh is None else self._run(fresh, 0)

    def pack(self, pinned: set[int], max_cells: int | None = None) -> list[Relocation]:
        """Move running sequences onto consecutive ids (per-sequence layout), idle ones they displace swapped into
        the ids they leave; the caller moves the cells before the next decode. Pinned ids stay where they are.

        The unified layout has one stream, which llama.cpp batches in any order: nothing to do there.
        """
        if self.n_cells is not None:
            return []
        running = {seq_id: self.ledger.length(seq_id) for seq_id in self._running}
        idle = {seq_id: len(entry.tokens) for seq_id, entry in self._idle.items()}
        plan = plan_packing(self.n_seq_max, running, idle, pinned, max_cells)
        for relocation in plan:
            source, target = relocation.source, relocation.target
            self._running.remove(source)
            self._running.add(target)
            if relocation.swap:
                self._idle[source] = self._idle.pop(target)
            else:
                self._free.remove(target)
                self._free.append(source)
            self.ledger.swap(source, target)
        return plan

    def park(self, seq_id: int, tokens: SequenceOf[int], owner: str | None = None, domain: str | None = None) -> bool:
        """A running sequence ended with `tokens` in its KV; keep it for reuse within its cache `domain`. False:
        clear it and free()."""
        self._check_running(seq_id)
        if not self.prefix_cache or not tokens:
            return False
        self._running.discard(seq_id)
        self._idle[seq_id] = _Idle(list(tokens), next(self._clock), owner, domain)
        return True

    def drop_idle(self, seq_id: int) -> None:
        """Forget an idle sequence whose cells are already gone."""
        if self._idle.pop(seq_id, None) is not None:
            self.evictions += 1
            self.ledger.drop(seq_id)
            self._free.append(seq_id)

    def evict_idle(self) -> list[int]:
        """Free every idle sequence (llama.cpp found no room); the caller clears their cells."""
        ids = list(self._idle)
        self.evictions += len(ids)
        self._idle.clear()
        self._free.extend(ids)
        for seq_id in ids:
            self.ledger.drop(seq_id)
        return ids

    def idle_conversations(self) -> list[Evicted]:
        """Idle sequences that hold a named conversation's KV, most recently used first (to save at shutdown)."""
        ordered = sorted(self._idle.items(), key=lambda item: -item[1].last_used)
        return [
            Evicted(seq_id, list(idle.tokens), idle.owner, idle.domain)
            for seq_id, idle in ordered
            if idle.owner is not None
        ]

    def longest_cached_prefix(
        self, prompt: SequenceOf[int], running: Mapping[int, SequenceOf[int]], domain: str | None = None
    ) -> int:
        """Most leading prompt tokens any sequence of the cache domain, idle or running, holds now."""
        return self._longest_prefix(prompt, running, domain)[1] if self.prefix_cache else 0

    def take_for_restore(self, n_cells: int) -> int | None:
        """An empty id to load a saved state of `n_cells` into, evicting idle sequences for the id and (unified
        layout) the cells; None when running sequences hold everything. Hand it to hold_restored or give_back."""
        if not self.prefix_cache or not self._make_room(n_cells, keep=None):
            return None
        return self._fresh_id(keep=None)

    def hold_restored(self, seq_id: int, tokens: SequenceOf[int], owner: str, domain: str | None = None) -> None:
        """A state was loaded into an id from take_for_restore: keep it as the conversation's idle sequence,
        reusable within the cache domain it was computed in."""
        self._idle[seq_id] = _Idle(list(tokens), next(self._clock), owner, domain)
        self.ledger.resize(seq_id, len(tokens))

    def give_back(self, seq_id: int) -> None:
        """Return an id from take_for_restore whose load failed; its cells must already be cleared."""
        self.ledger.drop(seq_id)
        self._free.append(seq_id)

    def owned_by(self, owner: str) -> list[int]:
        """Idle sequences that hold a named conversation's KV."""
        return [seq_id for seq_id, idle in self._idle.items() if idle.owner == owner]

    def forget(self, owner: str) -> list[int]:
        """Free the idle sequences of a deleted conversation; the caller clears their cells."""
        ids = self.owned_by(owner)
        for seq_id in ids:
            del self._idle[seq_id]
            self._free.append(seq_id)
            self.ledger.drop(seq_id)
        return ids

    def free(self, seq_id: int) -> None:
        """Return a running sequence's id to the pool; its cells must already be cleared."""
        self._check_running(seq_id)
        self._running.discard(seq_id)
        self._copies.pop(seq_id, None)
        self._free.append(seq_id)
        self.ledger.drop(seq_id)

    @staticmethod
    def _continues(idle: _Idle, shared: int, owner: str | None) -> bool:
        """True when a request simply goes on from an idle sequence: all of it is the request's prefix, and it
        belongs to the request's conversation or to none."""
        return shared == len(idle.tokens) and idle.owner in (None, owner)

    def _longest_prefix(
        self, prompt: SequenceOf[int], running: Mapping[int, SequenceOf[int]], domain: str | None
    ) -> tuple[int | None, int]:
        best_id, best_len = None, 0
        mine = [(seq_id, idle.tokens) for seq_id, idle in self._idle.items() if idle.domain == domain]
        holders = mine + list(running.items())
        for seq_id, tokens in holders:
            shared = common_prefix_length(tokens, prompt)
            if shared > best_len:
                best_id, best_len = seq_id, shared
        return best_id, best_len

    def _make_room(self, new_cells: int, keep: int | None) -> bool:
        """Evict idle sequences other than `keep` until `new_cells` fit (unified layout); False if even that is
        not enough (what was evicted stays evicted, and is reported by take_evicted)."""
        while self.n_cells is not None and self.ledger.cells_in_use() + new_cells > self.n_cells:
            if self.evict_lru(keep) is None:
                return False
        return True

    def _fresh_id(self, keep: int | None) -> int | None:
        """A free id, else the least recently used idle one other than `keep` (evicted); None if there is none."""
        if not self._free and self.evict_lru(keep) is None:
            return None
        # Next to running ids, so that a batch over them stays one micro-batch (see id_packing); lowest first.
        best = max(self._free, key=lambda i: ((i - 1 in self._running) + (i + 1 in self._running), -i))
        self._free.remove(best)
        return best

    def _run(self, seq_id: int, n_cached: int, copy_from: int | None = None) -> Allocation:
        self._running.add(seq_id)
        n_cached = max(n_cached, 0)
        copy_from = None if n_cached == 0 else copy_from
        if copy_from is not None:
            self._copies[seq_id] = copy_from
            self.ledger.copy(copy_from, seq_id, n_cached)
        elif n_cached:
            self.ledger.resize(seq_id, n_cached)
        else:
            self.ledger.drop(seq_id)
        return Allocation(seq_id, n_cached, copy_from)

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
