"""When KV goes to disk and when it comes back: the swap tier's policy, run by the engine loop.

- An idle conversation evicted from the KV cache is saved to the state directory (unless it is short or already
  saved as it is), instead of being dropped.
- A waiting turn of a conversation whose KV is not live is given its saved state back, when the file covers
  enough of its prompt and the measured costs say restoring beats recomputing.
- At shutdown every conversation still in KV is saved, so a worker restarted on the same directory resumes it.
- The explicit state operations of the protocol (save, load, list, delete).

Everything here runs on the engine thread under the engine lock, like the rest of the loop. An OSError from the
directory (a volume gone, full, read-only) fails the one operation that met it, and is counted: a swap-out is
skipped, a restore falls back to recomputing, an explicit operation answers `internal`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from llamaq.protocol import ConversationOp, ErrorCode, PrefixSource, ProtocolError, Request
from llamaq.protocol.errors import invalid

from .engine import DecodeError
from .kv_cache import Evicted, KvCache
from .metrics import WorkerMetrics
from .sequence import Sequence
from .state_dir import StateDirFull, StateKind
from .state_file import StateRefused
from .swap_tier import SwapTier

log = logging.getLogger("llamaq.state")

_OPERATION_OF = {
    ConversationOp.LIST_STATES: "list",
    ConversationOp.DELETE_STATE: "delete",
    ConversationOp.SAVE_STATE: "save",
    ConversationOp.LOAD_STATE: "restore",
}
"""The llamaq_state_dir_errors_total `operation` of each state operation."""

MIN_RESTORE_TOKENS = 32
"""Fewest prompt tokens a restore must spare to be worth a file read and a verification decode."""

RunningTokens = Callable[[str], Mapping[int, list[int]]]
"""What the running sequences of one cache domain have computed, by sequence id."""


class StateKeeper:
    """Swap-out, restore and state operations over one KV cache and one swap tier."""

    def __init__(self, kv: KvCache, swap: SwapTier, swap_min_tokens: int, metrics: WorkerMetrics | None = None) -> None:
        self.kv = kv
        self.swap = swap
        self.swap_min_tokens = swap_min_tokens
        self.metrics = metrics

    # --- eviction and shutdown ------------------------------------------------------------------------------

    def swap_out(self, evicted: Iterable[Evicted]) -> None:
        """Save the evicted conversations worth saving; their cells must still hold their tokens."""
        for idle in evicted:
            if idle.owner is not None and len(idle.tokens) >= self.swap_min_tokens:
                self._save_unless_saved(idle)

    def save_all(self) -> int:
        """Save every conversation the KV cache holds (at shutdown); how many were written."""
        written = 0
        for idle in self.kv.idle_conversations():
            written += self._save_unless_saved(idle)
        return written

    def _save_unless_saved(self, idle: Evicted) -> bool:
        assert idle.owner is not None
        try:
            if self.swap.is_saved(idle.owner, idle.tokens, idle.domain):
                return False
            self.swap.save(idle.seq_id, idle.tokens, idle.owner, StateKind.SWAP, idle.domain)
        except (StateDirFull, OSError, DecodeError) as exc:
            # Losing a swap file only costs a recompute from the history in Redis.
            log.warning("could not swap out conversation %s: %s", idle.owner, exc)
            if isinstance(exc, OSError):
                self._count_error("save")
            return False
        return True

    # --- restore ------------------------------------------------------------------------------------------

    def restore_waiting(self, waiting: Iterable[Sequence], running: RunningTokens) -> None:
        """Restore saved KV for the waiting conversations next in line whose KV is not live.

        Runs before the step is scheduled, so admission finds the restored sequence as the conversation's own
        idle one and continues it in place. Only files of the turn's own owner (the file names are
        owner-qualified) and cache domain are candidates.
        """
        for sequence in list(waiting)[: self.kv.n_free]:
            conversation = sequence.request.owned_conversation
            if sequence.restore_checked or conversation is None or sequence.preemptions:
                continue
            sequence.restore_checked = True
            if self.kv.owned_by(conversation):
                continue
            try:
                self._restore(sequence, conversation, running(sequence.request.cache_domain))
            except OSError as exc:
                log.warning("could not restore conversation %s from the state directory: %s", conversation, exc)
                self._count_error("restore")
                sequence.prefix_source = PrefixSource.RECOMPUTE

    def _restore(self, sequence: Sequence, conversation: str, running: Mapping[int, list[int]]) -> None:
        prompt = sequence.all_tokens()
        domain = sequence.request.cache_domain
        saved = self.swap.find(conversation, prompt, domain)
        if saved is None:
            if self.swap.last_refusal is not None:
                sequence.prefix_source = PrefixSource.RECOMPUTE
            return
        keep = min(saved.shared, len(prompt) - 1)
        spared = keep - self.kv.longest_cached_prefix(prompt, running, domain)
        if spared < MIN_RESTORE_TOKENS:
            return
        sequence.prefix_source = PrefixSource.RECOMPUTE
        if not self.swap.cost.restore_is_cheaper(len(saved.header.tokens), spared):
            log.info("conversation %s: recomputing %d tokens is cheaper than restoring", conversation, spared)
            return
        seq_id = self._take_for_restore(len(saved.header.tokens))
        if seq_id is None:
            sequence.restore_checked = False  # every id runs: try again when one is free
            sequence.prefix_source = PrefixSource.NONE
            return
        try:
            restored = self.swap.restore(seq_id, conversation, saved, keep)
        except StateRefused:
            self.kv.give_back(seq_id)
            return
        except OSError:
            # The file is read before anything is loaded: the sequence is still empty.
            self.kv.give_back(seq_id)
            raise
        self.kv.hold_restored(seq_id, prompt[:keep], conversation, domain)
        sequence.restored_into = seq_id
        sequence.restore_ms = restored.seconds * 1000.0
        sequence.prefix_source = PrefixSource.DISK

    def _take_for_restore(self, n_cells: int) -> int | None:
        """An empty id to load into; the idle sequences evicted for it are swapped out and cleared first, since
        the id handed out may be one of them."""
        seq_id = self.kv.take_for_restore(n_cells)
        evicted = self.kv.take_evicted()
        self.swap_out(evicted)
        for idle in evicted:
            self.swap.engine.free_sequence(idle.seq_id)
        return seq_id

    # --- operations -----------------------------------------------------------------------------------------

    def run(self, request: Request) -> dict[str, Any]:
        """Carry out a state operation; the map its result event carries. ProtocolError for what cannot be done.

        Every operation acts on the requester's own states only (Request.owner); another owner's conversation
        gets the answers of one without any state."""
        assert request.command is not None
        try:
            return self._run(request)
        except OSError as exc:
            log.error("state operation %s failed on the state directory: %s", request.command.op.value, exc)
            self._count_error(_OPERATION_OF.get(request.command.op, "save"))
            # The reason, not the path: the directory's layout is the operator's business.
            reason = exc.strerror or type(exc).__name__
            raise ProtocolError(ErrorCode.INTERNAL, f"the worker's state directory failed ({reason})") from exc

    def forget(self, conversation: str) -> None:
        """A deleted (owner-qualified) conversation leaves no KV on disk either."""
        try:
            self.swap.states.delete(conversation)
        except OSError as exc:
            log.warning("could not delete the state files of conversation %s: %s", conversation, exc)
            self._count_error("delete")

    def _count_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.count_state_dir_error(operation)

    def _run(self, request: Request) -> dict[str, Any]:
        assert request.command is not None
        op, conversation, owned = request.command.op, request.conversation, request.owned_conversation
        if op is ConversationOp.LIST_STATES:
            return self._list(request.owner)
        assert conversation is not None and owned is not None
        if op is ConversationOp.DELETE_STATE:
            return {"conversation": conversation, "deleted": self.swap.states.delete(owned)}
        if op is ConversationOp.SAVE_STATE:
            return self._save(owned, conversation)
        return self._load(owned, conversation)

    def _list(self, owner: str) -> dict[str, Any]:
        states: list[dict[str, Any]] = []
        total = 0
        for entry in self.swap.states.entries(owner):
            try:
                header = self.swap.states.read_header(entry.conversation, entry.kind)
                n_tokens = None if header is None else len(header.tokens)
            except StateRefused:
                n_tokens = None
            states.append(
                {
                    "conversation": entry.conversation.partition("/")[2],
                    "kind": entry.kind.value,
                    "n_bytes": entry.n_bytes,
                    "n_tokens": n_tokens,
                    "last_used": entry.last_used,
                }
            )
            total += entry.n_bytes
        return {"states": states, "n_bytes": total, "max_bytes": self.swap.states.max_bytes}

    def _save(self, owned: str, conversation: str) -> dict[str, Any]:
        held = [idle for idle in self.kv.idle_conversations() if idle.owner == owned]
        if held:
            idle = max(held, key=lambda each: len(each.tokens))
            try:
                n_bytes = self.swap.save(idle.seq_id, idle.tokens, owned, StateKind.SAVED, idle.domain)
            except StateDirFull as exc:
                raise invalid(f"state directory full: {exc}") from exc
            return {"conversation": conversation, "kind": "saved", "n_tokens": len(idle.tokens), "n_bytes": n_bytes}
        if self.swap.states.promote(owned):
            header = self.swap.states.read_header(owned, StateKind.SAVED)
            n_tokens = 0 if header is None else len(header.tokens)
            return {"conversation": conversation, "kind": "saved", "n_tokens": n_tokens, "promoted": True}
        raise invalid(
            f"conversation {conversation} holds no idle KV on this worker and has no swapped state "
            "(a turn in progress is saved after it ends)"
        )

    def _load(self, owned: str, conversation: str) -> dict[str, Any]:
        if self.kv.owned_by(owned):
            return {"conversation": conversation, "loaded": False, "reason": "already in the KV cache"}
        saved = self.swap.find(owned, None)
        if saved is None:
            refused = self.swap.last_refusal
            reason = "" if refused is None else f" (refused, {refused.reason.value}: {refused.message})"
            raise invalid(f"no usable saved state for conversation {conversation}{reason}")
        n_tokens = len(saved.header.tokens)
        seq_id = self._take_for_restore(n_tokens)
        if seq_id is None:
            raise ProtocolError(ErrorCode.OVERLOADED, "every sequence is running; load the state later")
        try:
            restored = self.swap.restore(seq_id, owned, saved, n_tokens)
        except StateRefused as refused:
            self.kv.give_back(seq_id)
            raise invalid(f"saved state refused ({refused.reason.value}): {refused.message}") from refused
        except OSError:
            self.kv.give_back(seq_id)
            raise
        # Reusable by later turns of the domain that computed it, not by whoever asked for the load.
        self.kv.hold_restored(seq_id, saved.header.tokens, owned, saved.header.cache_domain)
        return {
            "conversation": conversation,
            "loaded": True,
            "kind": saved.kind.value,
            "n_tokens": n_tokens,
            "restore_ms": round(restored.seconds * 1000.0, 3),
        }
