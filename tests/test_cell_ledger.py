"""The unified layout's cell ledger against a brute-force model of llama.cpp's cells: shared prefixes count once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llamaq.worker.cell_ledger import CellLedger


class BruteForceCells:
    """Every cell as (sequence that wrote it, position); a copy adds the target to the source's cells."""

    def __init__(self) -> None:
        self.holders: dict[tuple[int, int], set[int]] = {}
        self.writes = 0

    def length(self, seq_id: int) -> int:
        positions = [pos for (_, pos), who in self.holders.items() if seq_id in who]
        return max(positions) + 1 if positions else 0

    def copy(self, source: int, target: int, length: int) -> None:
        self.drop(target)
        for (_, pos), who in self.holders.items():
            if source in who and pos < length:
                who.add(target)

    def resize(self, seq_id: int, length: int) -> None:
        for (_, pos), who in self.holders.items():
            if pos >= length:
                who.discard(seq_id)
        for pos in range(self.length(seq_id), length):
            self.writes += 1
            self.holders[(self.writes, pos)] = {seq_id}
        self._collect()

    def drop(self, seq_id: int) -> None:
        for who in self.holders.values():
            who.discard(seq_id)
        self._collect()

    def cells(self) -> int:
        return len(self.holders)

    def _collect(self) -> None:
        self.holders = {cell: who for cell, who in self.holders.items() if who}


def test_a_copy_shares_its_prefix_and_grows_its_own_cells() -> None:
    ledger = CellLedger()
    ledger.resize(0, 100)
    ledger.copy(0, 1, 80)
    assert ledger.cells_in_use() == 100
    ledger.resize(1, 90)
    assert ledger.cells_in_use() == 110
    ledger.drop(0)
    assert ledger.cells_in_use() == 90 and ledger.length(1) == 90


def test_growing_a_group_someone_else_shares_takes_new_cells() -> None:
    ledger = CellLedger()
    ledger.resize(0, 50)
    ledger.copy(0, 1, 50)
    ledger.resize(0, 30)  # cut back: its cells 30..49 stay, sequence 1 still holds them
    ledger.resize(0, 40)  # ten new tokens in new cells
    assert ledger.cells_in_use() == 60


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["resize", "copy", "drop"]), st.integers(0, 3), st.integers(0, 3), st.integers(0, 40)
        ),
        max_size=40,
    )
)
def test_the_ledger_counts_what_the_brute_force_model_counts(actions: list[tuple[str, int, int, int]]) -> None:
    ledger, model = CellLedger(), BruteForceCells()
    for action, a, b, length in actions:
        if action == "resize":
            ledger.resize(a, length)
            model.resize(a, length)
        elif action == "copy" and a != b:
            shared = min(length, model.length(a))
            ledger.copy(a, b, shared)
            model.copy(a, b, shared)
        elif action == "drop":
            ledger.drop(a)
            model.drop(a)
        assert ledger.cells_in_use() == model.cells()
        assert all(ledger.length(s) == model.length(s) for s in range(4))
