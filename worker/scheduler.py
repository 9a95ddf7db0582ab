"""Scheduling policy: which sequences run, and how many tokens each feeds in the next decode step.

Pure logic over Sequence objects; the engine loop carries out the plan. Like vLLM's V1 scheduler there are no
separate prefill and decode phases: each step hands out one token budget, decodes first (one token for every
running sequence, so streams never stall), then chunks of pending prompts in admission order.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

from .id_packing import Relocation
from .kv_cache import MIN_COPY_TOKENS, Allocation, Evicted, KvCache, common_prefix_length
from .sequence import Sequence, Status


@dataclass(frozen=True)
class StepPlan:
    """What the next step does, in the order the engine must do it: clear the cells of `cleared` ids (evicted
    idle sequences, preempted running ones), carry out the relocations, give each admitted sequence its cached
    prefix (its cells from `n_computed` on removed, since an admitted id may hold another prompt's tail), decode
    the chunks. Relocations never touch an admitted sequence or the source of its copy, so the last two commute."""

    cleared: list[int]
    admitted: list[Sequence]
    chunks: list[Chunk]
    relocations: list[Relocation] = field(default_factory=list)
    """Running sequences moved onto consecutive ids; their Sequence.seq_id is already the target."""
    evicted: list[Evicted] = field(default_factory=list)
    """Idle sequences among `cleared`, with the tokens their cells hold until cleared (to swap out first)."""
    displaced: list[Evicted] = field(default_factory=list)
    """Idle conversations whose ids admitted sequences took over: their cells are cut back, not cleared."""


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence to feed in this step."""

    sequence: Sequence
    tokens: list[int]

    @property
    def completes_input(self) -> bool:
        """True when this chunk reaches the end of the sequence's tokens, so its logits are sampled."""
        return self.sequence.n_computed + len(self.tokens) == self.sequence.n_tokens


class Scheduler:
    """Waiting and running queues over one KV cache."""

    def __init__(self, kv: KvCache, token_budget: int) -> None:
        if token_budget < kv.n_seq_max:
            raise ValueError(f"a step budget of {token_budget} tokens cannot decode {kv.n_seq_max} sequences")
        self.kv = kv
        self.token_budget = token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        """Running sequences sent back to the queue: to make room (unified layout), or for higher priority."""
        self._arrivals = count()

    @property
    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def __iter__(self) -> Iterator[Sequence]:
        yield from self.running
        yield from self.waiting

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence behind those already waiting (admission still orders by priority and tenant)."""
        sequence.status = Status.WAITING
        sequence.arrival = next(self._arrivals)
        self.waiting.append(sequence)

    def schedule(self) -> StepPlan:
        """Admit what fits, then plan the next step: decodes first, then prefill chunks in admission order.

        In the unified layout the step's new cells must fit what is free: idle sequences are evicted first,
        then the most recently admitted running sequences are preempted (vLLM's recompute: their cells are
        cleared and they go back to the head of the queue, keeping what they generated and their event numbers).
        """
        cleared: list[int] = []
        admitted = self._admit(cleared)
        chunks = self._plan()
        room = self.kv.room()
        while room is not None and sum(len(c.tokens) for c in chunks) > room:
            # An evicted idle id is reported by take_evicted below.
            if self.kv.evict_lru() is None:
                if len(self.running) <= 1:
                    break  # one sequence always fits: its prompt plus max_tokens was checked against the cells
                victim = self._victim(self._preemptible(self.running))
                if victim is None:
                    break  # only sources of this round's copies run: the step's new cells wait for them
                assert victim.seq_id is not None
                cleared.append(victim.seq_id)
                if victim in admitted:
                    admitted.remove(victim)
                self._preempt(victim)
            chunks = self._plan()
            room = self.kv.room()
        relocations = self._pack(admitted)
        # Every id evicted here, during admission too, must be cleared, even when no admission followed.
        evicted = self.kv.take_evicted()
        self.kv.end_round()
        cleared = [e.seq_id for e in evicted] + cleared
        return StepPlan(cleared, admitted, chunks, relocations, evicted, self.kv.take_displaced())

    def _pack(self, admitted: list[Sequence]) -> list[Relocation]:
        """Move running sequences onto consecutive ids (see id_packing), at most about one window of cells a step.

        Pinned: this round's admissions and the sources of their copies (carried out after the relocations, by
        id), idle sequences a waiting request's state was just restored into, and sequences about to end.
        """
        pinned = {s.seq_id for s in admitted if s.seq_id is not None} | self.kv.copy_sources()
        pinned |= {s.restored_into for s in self.waiting if s.restored_into is not None}
        pinned |= {s.seq_id for s in self.running if s.seq_id is not None and s.max_tokens - len(s.generated) <= 2}
        relocations = self.kv.pack(pinned, max_cells=self.kv.window)
        if relocations:
            by_id = {s.seq_id: s for s in self.running}
            for relocation in relocations:
                by_id[relocation.source].seq_id = relocation.target
        return relocations

    def _plan(self) -> list[Chunk]:
        budget = self.token_budget
        decodes = [s for s in self.running if not s.prefilling]
        plan = [Chunk(s, s.pending_tokens(1)) for s in decodes]
        budget -= len(plan)
        for sequence in self.running:
            if budget <= 0:
                break
            if sequence.prefilling:
                tokens = sequence.pending_tokens(budget)
                plan.append(Chunk(sequence, tokens))
                budget -= len(tokens)
        return plan

    def _preempt(self, sequence: Sequence) -> None:
        assert sequence.seq_id is not None
        self.running.remove(sequence)
        self.kv.free(sequence.seq_id)
        sequence.seq_id = None
        sequence.copy_from = None
        sequence.n_computed = 0
        sequence.preemptions += 1
        self.preemptions += 1
        sequence.status = Status.WAITING
        self.waiting.appendleft(sequence)

    def lost_kv(self, sequence: Sequence, idle_id: int | None = None) -> None:
        """A running sequence's cells are gone (a failed move): it goes back to the queue to be computed again, as
        a preempted one does; its chunk of this step must not be decoded. `idle_id` names an idle sequence whose
        cells went with it."""
        if idle_id is not None:
            self.kv.drop_idle(idle_id)
        self._preempt(sequence)

    def record_decoded(self, chunk: Chunk) -> bool:
        """Account for a decoded chunk; True when its last token's logits are to be sampled."""
        wants_token = chunk.completes_input
        sequence = chunk.sequence
        sequence.n_computed += len(chunk.tokens)
        assert sequence.seq_id is not None
        self.kv.resize(sequence.seq_id, sequence.n_computed)
        return wants_token

    def release(self, sequence: Sequence, keep_cache: bool) -> int | None:
        """Take a finished sequence out of the queues. Its KV is parked for reuse when keep_cache allows;
        otherwise the id it held is returned, and the caller clears that sequence's cells at once."""
        to_clear = None
        if sequence.status is Status.RUNNING:
            self.running.remove(sequence)
            seq_id = sequence.seq_id
            assert seq_id is not None
            request = sequence.request
            owner, domain = request.owned_conversation, request.cache_domain
            if not (keep_cache and self.kv.park(seq_id, sequence.computed_tokens(), owner, domain)):
                self.kv.free(seq_id)
                to_clear = seq_id
            sequence.seq_id = None
        elif sequence.status is Status.WAITING:
            self.waiting.remove(sequence)
        sequence.status = Status.FINISHED
        return to_clear

    def _admit(self, cleared: list[int]) -> list[Sequence]:
        """Admit waiting sequences, highest priority first, then the tenant with the fewest running, then
        arrival. A sequence that finds no room may preempt a running one of lower priority (its id goes to
        `cleared`)."""
        admitted: list[Sequence] = []
        running_by_tenant = Counter(_tenant(s) for s in self.running)
        waiting = sorted(self.waiting, key=lambda s: (-s.request.priority, s.arrival))
        while waiting:
            sequence = min(waiting, key=lambda s: (-s.request.priority, running_by_tenant[_tenant(s)], s.arrival))
            waiting.remove(sequence)
            if self._prefix_in_progress(sequence):
                continue
            allocation = self._allocate(sequence)
            if allocation is None:
                lower = [s for s in self.running if s.request.priority < sequence.request.priority]
                victim = self._victim(self._preemptible(lower))
                if victim is None:
                    break
                assert victim.seq_id is not None
                cleared.append(victim.seq_id)
                if victim in admitted:
                    admitted.remove(victim)
                self._preempt(victim)
                running_by_tenant[_tenant(victim)] -= 1
                allocation = self._allocate(sequence)
                if allocation is None:
                    break
            self.waiting.remove(sequence)
            sequence.seq_id = allocation.seq_id
            sequence.copy_from = allocation.copy_from
            sequence.n_computed = allocation.n_cached
            if not sequence.preemptions:
                sequence.cached_tokens = allocation.n_cached
            sequence.status = Status.RUNNING
            sequence.admitted_at = time.monotonic()
            self.running.append(sequence)
            admitted.append(sequence)
            running_by_tenant[_tenant(sequence)] += 1
        return admitted

    def _allocate(self, sequence: Sequence) -> Allocation | None:
        request = sequence.request
        # Only the requester's own cache domain may lend it KV: another tenant's prompt must not show up as cached.
        peers = (s for s in self.running if s.request.cache_domain == request.cache_domain)
        computed = {s.seq_id: s.computed_tokens() for s in peers if s.seq_id is not None}
        return self.kv.admit(sequence.all_tokens(), computed, request.owned_conversation, request.cache_domain)

    def _preemptible(self, candidates: list[Sequence]) -> list[Sequence]:
        """Those whose KV no admission of this round copies: the engine clears a victim before it copies."""
        return [s for s in candidates if s.seq_id is not None and not self.kv.is_copy_source(s.seq_id)]

    @staticmethod
    def _victim(candidates: list[Sequence]) -> Sequence | None:
        """Whom to preempt: the lowest priority, and among those the most recently admitted (least work lost)."""
        if not candidates:
            return None
        return min(reversed(candidates), key=lambda s: s.request.priority)

    def _prefix_in_progress(self, sequence: Sequence) -> bool:
        """True while a running sequence is still prefilling a long prefix this one shares: waiting a few steps
        to copy it beats computing it twice. Later requests are admitted past this one meanwhile."""
        if not self.kv.prefix_cache:
            return False
        for running in self.running:
            # Waiting on another domain's prefix would make its prompt visible as a delay (a timing leak).
            if running.prefilling and running.request.cache_domain == sequence.request.cache_domain:
                shared = common_prefix_length(running.prompt_tokens, sequence.prompt_tokens)
                if shared >= MIN_COPY_TOKENS and running.n_computed < min(shared, len(sequence.prompt_tokens) - 1):
                    return True
        return False


def _tenant(sequence: Sequence) -> str:
    """The fairness key: the request's tenant, else the client that sent it."""
    return sequence.request.tenant or sequence.request.client_id
