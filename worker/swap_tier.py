"""KV sequences to disk and back: save with the logits to check by, restore only what proves itself live.

Runs on the engine thread (it drives the Engine) and owns the state directory's contents for this worker. A
restore is trusted only after the restored sequence reproduces the next-token logits recorded at save time: a
state that loaded "successfully" but left the KV empty or wrong (as GPU restores have been seen to do) is caught
there, discarded and counted, and the caller recomputes the prefix instead.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from .engine import Engine
from .kv_cache import common_prefix_length
from .restore_cost import RestoreCost
from .state_dir import StateDir, StateKind
from .state_file import (
    Fingerprint,
    RefusalReason,
    StateHeader,
    StateRefused,
    check_fingerprint,
    decode_state,
    encode_state,
)

log = logging.getLogger("llamaq.swap")


@dataclass(frozen=True)
class SavedState:
    """A state file that matches a prompt: which file, what it holds, and how many prompt tokens it covers."""

    kind: StateKind
    header: StateHeader
    shared: int


@dataclass(frozen=True)
class Restored:
    """A state loaded into a sequence and verified."""

    n_tokens: int
    """Positions the sequence holds now (the file's tokens cut back to what the prompt shares)."""
    seconds: float


class SwapTier:
    """Saves and restores sequences of one Engine in one state directory."""

    def __init__(self, engine: Engine, states: StateDir, fingerprint: Fingerprint, logits_tolerance: float) -> None:
        self.engine = engine
        self.states = states
        self.fingerprint = fingerprint
        self.logits_tolerance = logits_tolerance
        """Largest absolute logit difference a restore may show (0: bit-identical, as the CPU gives)."""
        self.cost = RestoreCost()
        self.swaps_out = 0
        self.swaps_in = 0
        self.check_failures = 0
        self.refusals: Counter[str] = Counter()
        """Refused files by RefusalReason value (failed checks included)."""
        self.last_refusal: StateRefused | None = None
        """Why the last find() or restore() refused a file, if it did."""

    def save(
        self, seq_id: int, tokens: list[int], conversation: str, kind: StateKind, domain: str | None = None
    ) -> int:
        """Write a sequence that holds `tokens`, computed in cache `domain`, to a state file of an owner-qualified
        conversation; its size in bytes. StateDirFull if it cannot fit.

        The sequence's last position is decoded again to record the logits a restore must reproduce.
        """
        payload = self.engine.sequence_state(seq_id)
        logits = self.engine.next_token_logits(seq_id, tokens)
        data = encode_state(conversation, tokens, self.fingerprint, bytes(payload), logits, domain)
        self.states.write(conversation, kind, data)
        if kind is StateKind.SWAP:
            self.swaps_out += 1
        return len(data)

    def is_saved(self, conversation: str, tokens: list[int], domain: str | None = None) -> bool:
        """True when a state file of this conversation already holds exactly these tokens, from this domain."""
        for kind in StateKind:
            try:
                header = self.states.read_header(conversation, kind)
            except StateRefused:
                continue
            if header is not None and list(header.tokens) == tokens and header.cache_domain == domain:
                return True
        return False

    def find(self, conversation: str, prompt: list[int] | None, domain: str | None = None) -> SavedState | None:
        """The state file of a conversation that shares the longest prefix with a prompt of cache `domain` (a
        file from another domain never matches; without a prompt: the longest file of any domain, saved ones
        first); unusable files are refused (counted) and swap files among them deleted."""
        self.last_refusal = None
        best: SavedState | None = None
        for kind in (StateKind.SAVED, StateKind.SWAP):
            try:
                header = self.states.read_header(conversation, kind)
                if header is None:
                    continue
                check_fingerprint(header, self.fingerprint)
            except StateRefused as refused:
                self._refused(conversation, kind, refused)
                continue
            if prompt is not None and header.cache_domain != domain:
                continue
            shared = len(header.tokens) if prompt is None else common_prefix_length(header.tokens, prompt)
            if shared > 0 and (best is None or shared > best.shared):
                best = SavedState(kind, header, shared)
        return best

    def restore(self, seq_id: int, conversation: str, saved: SavedState, keep: int) -> Restored:
        """Load a state file into an empty sequence, verify it, cut it back to `keep` positions.

        StateRefused (counted, the sequence left empty) when the file is unsound or the check fails.
        """
        started = time.perf_counter()
        self.last_refusal = None
        try:
            data = self.states.read(conversation, saved.kind)
            if data is None:
                raise StateRefused(RefusalReason.TRUNCATED, "the file disappeared")
            record = decode_state(data, self.fingerprint)
            if not self.engine.restore_sequence_state(seq_id, record.payload):
                raise StateRefused(RefusalReason.LOAD_FAILED, "llama.cpp did not accept the state")
            tokens = list(record.header.tokens)
            loaded = time.perf_counter()
            held = self.engine.sequence_length(seq_id)
            if held != len(tokens):
                self._failed_check(seq_id, f"the restored sequence holds {held} positions, the file {len(tokens)}")
            logits = self.engine.next_token_logits(seq_id, tokens)
            verified = time.perf_counter()
            if not logits_match(logits, record.logits, self.logits_tolerance):
                difference = logits_difference(logits, record.logits)
                self._failed_check(seq_id, f"the restored sequence gives other logits (max difference {difference})")
        except StateRefused as refused:
            self._refused(conversation, saved.kind, refused)
            raise
        if not self.engine.truncate_sequence(seq_id, keep):
            self.engine.free_sequence(seq_id)
            raise StateRefused(RefusalReason.LOAD_FAILED, "llama.cpp refused to cut the restored sequence back")
        self.cost.record_restore(len(tokens), loaded - started, verified - loaded)
        self.swaps_in += 1
        return Restored(keep, time.perf_counter() - started)

    def _failed_check(self, seq_id: int, message: str) -> NoReturn:
        self.engine.free_sequence(seq_id)
        self.check_failures += 1
        raise StateRefused(RefusalReason.FAILED_CHECK, message)

    def _refused(self, conversation: str, kind: StateKind, refused: StateRefused) -> None:
        self.last_refusal = refused
        self.refusals[refused.reason.value] += 1
        log.warning("state of conversation %s (%s) refused: %s", conversation, kind.value, refused)
        # A swap file is only a cache; one that failed once would fail again. Saved files stay for the operator.
        if kind is StateKind.SWAP:
            self.states.delete(conversation, kind)


def logits_match(found: bytes, recorded: bytes, tolerance: float) -> bool:
    """True when two float32 logit vectors agree: bit for bit at tolerance 0, else within it, same argmax."""
    if tolerance <= 0.0:
        return found == recorded
    if len(found) != len(recorded):
        return False
    a, b = np.frombuffer(found, dtype=np.float32), np.frombuffer(recorded, dtype=np.float32)
    return bool(np.argmax(a) == np.argmax(b) and float(np.max(np.abs(a - b))) <= tolerance)


def logits_difference(found: bytes, recorded: bytes) -> float:
    """Largest absolute difference between two float32 logit vectors (inf when their sizes differ)."""
    if len(found) != len(recorded):
        return float("inf")
    a, b = np.frombuffer(found, dtype=np.float32), np.frombuffer(recorded, dtype=np.float32)
    return float(np.max(np.abs(a - b)))
