"""Saving and restoring KV sequences on the real model: a restore reproduces the saved logits to the bit, and
every unsound file (truncated, corrupt, another model, other KV settings, or one that loads but holds the wrong
KV) is refused, counted, and leaves the sequence empty for a recompute."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from llamaq.worker.engine import BatchSlice, Engine, EngineConfig
from llamaq.worker.model_files import model_digest
from llamaq.worker.state_dir import StateDir, StateKind
from llamaq.worker.state_file import Fingerprint, RefusalReason, StateRefused, decode_state, encode_state
from llamaq.worker.swap_tier import SwapTier

pytestmark = pytest.mark.slow

CONVERSATION = "t.acme/conversation-under-test"
"""Owner-qualified, as the worker names a conversation's state."""


def fingerprint_of(engine: Engine) -> Fingerprint:
    return Fingerprint.of(model_digest(engine.config.model_path), **engine.config.kv_settings())


def prefill(engine: Engine, seq_id: int, tokens: list[int]) -> None:
    for start in range(0, len(tokens), 128):
        engine.decode([BatchSlice(seq_id, tokens[start : start + 128], start, False)])


@pytest.fixture(scope="module", params=[False, True], ids=["per-sequence", "unified"])
def engine(request: pytest.FixtureRequest, model_path: Path) -> Iterator[Engine]:
    engine = Engine(EngineConfig(model_path, n_ctx=4096, n_seq_max=4, n_batch=256, kv_unified=request.param))
    yield engine
    engine.close()


@pytest.fixture
def tier(engine: Engine, tmp_path: Path) -> Iterator[SwapTier]:
    yield SwapTier(engine, StateDir(tmp_path, 1 << 30), fingerprint_of(engine), logits_tolerance=0.0)
    for seq_id in range(engine.n_seq_max):
        engine.free_sequence(seq_id)


def history(engine: Engine, words: int = 120) -> list[int]:
    return engine.tokenize("The keeper climbed the lighthouse stairs every evening at dusk. " * (words // 10))


def test_a_restored_sequence_reproduces_the_saved_logits_bit_for_bit(engine: Engine, tier: SwapTier) -> None:
    tokens = history(engine)
    prefill(engine, 1, tokens)
    prefill(engine, 2, engine.tokenize("Unrelated traffic in a neighbouring sequence. " * 20))
    tier.save(1, tokens, CONVERSATION, StateKind.SWAP)
    engine.free_sequence(1)
    saved = tier.find(CONVERSATION, [*tokens, 42])
    assert saved is not None and saved.shared == len(tokens)
    restored = tier.restore(3, CONVERSATION, saved, keep=len(tokens) - 1)
    assert restored.n_tokens == len(tokens) - 1 == engine.sequence_length(3)
    assert tier.swaps_in == 1 and tier.check_failures == 0 and not tier.refusals


def corrupt(tier: SwapTier, data: bytes) -> None:
    tier.states.write(CONVERSATION, StateKind.SAVED, data)


def saved_file(engine: Engine, tier: SwapTier) -> tuple[list[int], bytes]:
    tokens = history(engine)
    prefill(engine, 1, tokens)
    tier.save(1, tokens, CONVERSATION, StateKind.SAVED)
    data = tier.states.read(CONVERSATION, StateKind.SAVED)
    assert data is not None
    engine.free_sequence(1)
    return tokens, data


def refused_restore(engine: Engine, tier: SwapTier, tokens: list[int]) -> RefusalReason:
    saved = tier.find(CONVERSATION, tokens)
    if saved is None:
        assert tier.last_refusal is not None
        return tier.last_refusal.reason
    with pytest.raises(StateRefused) as refused:
        tier.restore(3, CONVERSATION, saved, keep=len(tokens) - 1)
    assert engine.sequence_length(3) == 0, "a refused restore leaves the sequence empty"
    return refused.value.reason


def test_a_truncated_file_is_refused(engine: Engine, tier: SwapTier) -> None:
    tokens, data = saved_file(engine, tier)
    corrupt(tier, data[: len(data) // 2])
    assert refused_restore(engine, tier, tokens) is RefusalReason.TRUNCATED


def test_a_corrupt_file_is_refused(engine: Engine, tier: SwapTier) -> None:
    tokens, data = saved_file(engine, tier)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    corrupt(tier, bytes(damaged))
    assert refused_restore(engine, tier, tokens) is RefusalReason.CORRUPT


def save_from_another_engine(tier: SwapTier, config: EngineConfig) -> list[int]:
    """A state file of CONVERSATION written by a real engine with another model file or other settings."""
    other = Engine(config)
    try:
        other_tier = SwapTier(other, tier.states, fingerprint_of(other), 0.0)
        tokens = history(other)
        prefill(other, 1, tokens)
        other_tier.save(1, tokens, CONVERSATION, StateKind.SAVED)
    finally:
        other.close()
    return tokens


def test_a_state_of_another_model_is_refused(engine: Engine, tier: SwapTier, tmp_path: Path) -> None:
    """Another GGUF file (the same weights under another name: a different file) writes a state this worker
    refuses, even though llama.cpp could load its bytes."""
    other_model = tmp_path / "renamed.gguf"
    other_model.write_bytes(engine.config.model_path.read_bytes().replace(b"Smollm2 135M", b"Smollm2 136M", 1))
    tokens = save_from_another_engine(tier, replace(engine.config, model_path=other_model))
    assert refused_restore(engine, tier, tokens) is RefusalReason.OTHER_MODEL


def test_a_state_saved_with_other_kv_settings_is_refused(engine: Engine, tier: SwapTier) -> None:
    tokens = save_from_another_engine(tier, replace(engine.config, n_ctx=2048))
    assert refused_restore(engine, tier, tokens) is RefusalReason.INCOMPATIBLE_SETTINGS
    assert "n_ctx 2048 (here 4096)" in str(tier.last_refusal)


def test_a_state_that_loads_but_holds_the_wrong_kv_fails_the_check(engine: Engine, tier: SwapTier) -> None:
    """What a GPU restore that silently lost its KV looks like: a sound file whose cells do not hold the
    history it names. The logits check catches it, and the failure is counted."""
    tokens, data = saved_file(engine, tier)
    impostor = engine.tokenize("A different story about a ship lost at sea in the night. " * 12)[: len(tokens)]
    prefill(engine, 2, impostor)
    record = decode_state(data, tier.fingerprint)
    wrong_kv = bytes(engine.sequence_state(2))
    corrupt(tier, encode_state(CONVERSATION, tokens, tier.fingerprint, wrong_kv, record.logits))
    assert refused_restore(engine, tier, tokens) is RefusalReason.FAILED_CHECK
    assert tier.check_failures == 1 and tier.refusals["failed_check"] == 1


def test_a_state_whose_cells_are_fewer_than_its_tokens_fails_the_check(engine: Engine, tier: SwapTier) -> None:
    tokens, data = saved_file(engine, tier)
    prefill(engine, 2, tokens[:50])
    record = decode_state(data, tier.fingerprint)
    short_kv = bytes(engine.sequence_state(2))
    corrupt(tier, encode_state(CONVERSATION, tokens, tier.fingerprint, short_kv, record.logits))
    assert refused_restore(engine, tier, tokens) is RefusalReason.FAILED_CHECK
    assert "holds 50 positions" in str(tier.last_refusal)


def test_a_refused_swap_file_is_deleted_and_a_saved_one_kept(engine: Engine, tier: SwapTier) -> None:
    tokens, data = saved_file(engine, tier)
    tier.states.write(CONVERSATION, StateKind.SWAP, data[:100])
    corrupt(tier, data[:100])
    assert tier.find(CONVERSATION, tokens) is None
    kinds = {entry.kind for entry in tier.states.entries()}
    assert kinds == {StateKind.SAVED}
