"""Cells in use in a unified KV buffer, where a copied prefix shares its cells with the sequence it came from.

Pure bookkeeping: a sequence's positions are spans of "groups" of cells. A copy references the source's
groups up to the copied length; new tokens extend the sequence's own last group, or start a new group when
another sequence still shares that one. A group's cells stay in use up to the furthest position any holder
references, which is what llama.cpp does with cells that several sequences share.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count


@dataclass(frozen=True)
class _Span:
    group: int
    start: int
    end: int


class CellLedger:
    """Per-sequence spans of shared cell groups; the cells in use are their union."""

    def __init__(self) -> None:
        self._spans: dict[int, list[_Span]] = {}
        self._holders: dict[int, int] = {}
        """Sequences referencing each group: a group held by one sequence alone may grow in place."""
        self._groups = count()

    def cells_in_use(self) -> int:
        """Cells held by all sequences, each shared cell counted once."""
        start: dict[int, int] = {}
        end: dict[int, int] = {}
        for spans in self._spans.values():
            for span in spans:
                start[span.group] = min(start.get(span.group, span.start), span.start)
                end[span.group] = max(end.get(span.group, span.end), span.end)
        return sum(end[group] - start[group] for group in start)

    def length(self, seq_id: int) -> int:
        """Positions a sequence holds."""
        spans = self._spans.get(seq_id)
        return spans[-1].end if spans else 0

    def copy(self, source: int, target: int, length: int) -> None:
        """Target now holds source's first `length` positions, in the same cells."""
        self._set(target, _clip(self._spans.get(source, []), length))

    def resize(self, seq_id: int, length: int) -> None:
        """A sequence was cut back to, or grew to, `length` positions (growth takes new cells)."""
        spans = self._spans.get(seq_id, [])
        current = spans[-1].end if spans else 0
        if length == current:
            return  # the common case, a decoded token already counted: nothing to rebuild
        if length < current:
            self._set(seq_id, _clip(spans, length))
            return
        last = spans[-1] if spans else None
        if last is not None and self._holders[last.group] == 1:
            spans[-1] = _Span(last.group, last.start, length)
        else:
            group = next(self._groups)
            self._holders[group] = 1
            spans.append(_Span(group, current, length))
        self._spans[seq_id] = spans

    def swap(self, a: int, b: int) -> None:
        """Two ids exchanged what they hold (either may hold nothing)."""
        spans_a, spans_b = self._spans.pop(a, None), self._spans.pop(b, None)
        if spans_a is not None:
            self._spans[b] = spans_a
        if spans_b is not None:
            self._spans[a] = spans_b

    def drop(self, seq_id: int) -> None:
        """A sequence's cells were cleared; what it shared stays with the others."""
        self._set(seq_id, [])

    def _set(self, seq_id: int, spans: list[_Span]) -> None:
        for span in self._spans.pop(seq_id, []):
            self._holders[span.group] -= 1
            if not self._holders[span.group]:
                del self._holders[span.group]
        for span in spans:
            self._holders[span.group] = self._holders.get(span.group, 0) + 1
        if spans:
            self._spans[seq_id] = spans


def _clip(spans: list[_Span], length: int) -> list[_Span]:
    return [_Span(s.group, s.start, min(s.end, length)) for s in spans if s.start < length]
