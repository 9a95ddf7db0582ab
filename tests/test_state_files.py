"""State files without the model: the format refuses every unsound file, the directory keeps under its cap,
and the restore-or-recompute choice follows measured costs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llamaq.worker.restore_cost import RestoreCost
from llamaq.worker.state_dir import StateDir, StateDirFull, StateKind
from llamaq.worker.state_file import (
    MAGIC,
    Fingerprint,
    RefusalReason,
    StateRefused,
    decode_header,
    decode_state,
    encode_state,
    header_length,
)

FINGERPRINT = Fingerprint.of("a" * 64, n_ctx=4096, kv_type="q8_0", n_gpu_layers=0)
TOKENS = [1, 2, 3, 4, 5]
A, B, C = "t.acme/conversation-a", "t.acme/conversation-b", "t.acme/conversation-c"
"""Owner-qualified conversation ids, as the worker names state files."""


def state_bytes(fingerprint: Fingerprint = FINGERPRINT, payload: bytes = b"kv" * 100) -> bytes:
    return encode_state("conversation-1", TOKENS, fingerprint, payload, b"\x00\x01\x02\x03" * 8)


def refusal(data: bytes, expected: Fingerprint = FINGERPRINT) -> RefusalReason:
    with pytest.raises(StateRefused) as refused:
        decode_state(data, expected)
    return refused.value.reason


def test_a_sound_file_round_trips() -> None:
    record = decode_state(state_bytes(), FINGERPRINT)
    assert record.header.tokens == tuple(TOKENS)
    assert record.header.conversation == "conversation-1"
    assert record.payload == b"kv" * 100
    assert record.logits == b"\x00\x01\x02\x03" * 8


def test_a_truncated_file_is_refused_at_any_length() -> None:
    data = state_bytes()
    for length in (0, 5, 12, 40, len(data) // 2, len(data) - 1):
        assert refusal(data[:length]) in {
            RefusalReason.TRUNCATED,
            RefusalReason.NOT_A_STATE_FILE,
            RefusalReason.CORRUPT,
        }
    assert refusal(data[:-1]) is RefusalReason.TRUNCATED


def test_any_flipped_byte_is_refused() -> None:
    data = state_bytes()
    for position in range(len(MAGIC), len(data), 7):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x40
        assert refusal(bytes(corrupt)) is not None


def test_a_flipped_payload_byte_fails_the_checksum() -> None:
    data = bytearray(state_bytes())
    data[-100] ^= 0x01
    assert refusal(bytes(data)) is RefusalReason.CORRUPT


def test_trailing_bytes_are_refused() -> None:
    assert refusal(state_bytes() + b"x") is RefusalReason.CORRUPT


def test_a_file_that_is_not_a_state_file_is_refused() -> None:
    assert refusal(b"GGUF" + bytes(100)) is RefusalReason.NOT_A_STATE_FILE


def test_another_format_version_is_refused() -> None:
    data = state_bytes().replace(b"\xa7version\x01", b"\xa7version\x63")
    assert refusal(data) is RefusalReason.UNSUPPORTED_VERSION


def test_a_state_of_another_model_is_refused() -> None:
    other = Fingerprint("b" * 64, FINGERPRINT.settings)
    assert refusal(state_bytes(other)) is RefusalReason.OTHER_MODEL


def test_a_state_saved_with_other_kv_settings_is_refused_naming_them() -> None:
    other = Fingerprint.of("a" * 64, n_ctx=8192, kv_type="q8_0", n_gpu_layers=0)
    with pytest.raises(StateRefused) as refused:
        decode_state(state_bytes(other), FINGERPRINT)
    assert refused.value.reason is RefusalReason.INCOMPATIBLE_SETTINGS
    assert "n_ctx 8192 (here 4096)" in refused.value.message


def test_the_header_reads_without_the_payload() -> None:
    data = state_bytes()
    header = decode_header(data[: header_length(data[:12])])
    assert header.tokens == tuple(TOKENS) and header.payload_bytes == 200


def test_swap_files_go_least_recently_used_first_to_keep_under_the_cap(tmp_path: Path) -> None:
    states = StateDir(tmp_path, max_bytes=250)
    for index, name in enumerate([A, B]):
        path = states.write(name, StateKind.SWAP, bytes(100))
        os.utime(path, (time.time() - 100 + index, time.time() - 100 + index))
    states.read(A, StateKind.SWAP)  # a is now the most recently used
    states.write(C, StateKind.SWAP, bytes(100))
    names = {entry.conversation for entry in states.entries()}
    assert names == {A, C}
    assert states.total_bytes() <= 250


def test_saved_states_are_never_deleted_to_make_room(tmp_path: Path) -> None:
    states = StateDir(tmp_path, max_bytes=250)
    states.write(A, StateKind.SAVED, bytes(100))
    states.write(B, StateKind.SAVED, bytes(100))
    with pytest.raises(StateDirFull):
        states.write(C, StateKind.SWAP, bytes(100))
    states.write(B, StateKind.SAVED, bytes(120))  # replacing its own file fits
    assert {e.conversation for e in states.entries()} == {A, B}


def test_a_swap_file_promoted_to_saved_survives_the_cap(tmp_path: Path) -> None:
    states = StateDir(tmp_path, max_bytes=250)
    states.write(A, StateKind.SWAP, bytes(100))
    assert states.promote(A)
    states.write(B, StateKind.SWAP, bytes(100))
    states.write(C, StateKind.SWAP, bytes(100))
    kinds = {(e.conversation, e.kind) for e in states.entries()}
    assert (A, StateKind.SAVED) in kinds and len(kinds) == 2
    assert states.delete(A) == 1


def test_state_file_names_refuse_anything_but_conversation_ids(tmp_path: Path) -> None:
    states = StateDir(tmp_path, max_bytes=1000)
    for bad in ["../../etc/passwd", "a/b", "short", "", "conversation-a", "t.acme/../../etc", "t.acme/short"]:
        with pytest.raises(ValueError):
            states.file(bad, StateKind.SWAP)
    for bad_owner in ["x.acme", "t.", "c.short", "t.a/b", "..", "t.ac{me}"]:
        with pytest.raises(ValueError):
            states.file(f"{bad_owner}/conversation-a", StateKind.SWAP)


def test_each_owner_lists_only_its_own_state_files(tmp_path: Path) -> None:
    """Files live in a folder per owner; the same conversation id of two owners names two files."""
    states = StateDir(tmp_path, max_bytes=10_000)
    states.write("t.acme/conversation-a", StateKind.SAVED, bytes(10))
    states.write("t.globex/conversation-a", StateKind.SAVED, bytes(20))
    states.write("c.client-00000001/conversation-b", StateKind.SWAP, bytes(30))
    assert [e.conversation for e in states.entries("t.acme")] == ["t.acme/conversation-a"]
    assert [e.n_bytes for e in states.entries("t.globex")] == [20]
    assert len(states.entries()) == 3 and states.total_bytes() == 60
    assert states.delete("t.acme/conversation-a") == 1
    assert states.read("t.globex/conversation-a", StateKind.SAVED) == bytes(20)


def test_restoring_is_tried_until_both_costs_are_measured() -> None:
    cost = RestoreCost()
    assert cost.restore_is_cheaper(4096, 10)
    cost.record_prefill(1000, 5.0)
    assert cost.restore_is_cheaper(4096, 10)


def test_the_cheaper_path_wins_once_measured() -> None:
    cost = RestoreCost()
    cost.record_prefill(1000, 5.0)  # 5 ms per token
    cost.record_restore(1000, load_s=0.1, verify_s=0.02)  # 0.1 ms per token + 20 ms
    assert cost.restore_is_cheaper(1024, 1024)
    assert not cost.restore_is_cheaper(1024, 3)  # 3 tokens to compute: 15 ms < 122 ms to restore
    cost.record_prefill(1000, 0.01)  # a fast accelerator: prefill gets cheap
    for _ in range(20):
        cost.record_prefill(1000, 0.01)
    assert not cost.restore_is_cheaper(1024, 1024)
