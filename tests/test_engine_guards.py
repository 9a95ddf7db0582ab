"""The engine refuses, with a Python exception, the calls that would abort the process inside llama.cpp."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamaq.protocol import ChatMessage, SamplingParams
from llamaq.worker.engine import BatchSlice, DecodeError, Engine, EngineConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    loaded = Engine(EngineConfig(model_path=model_path, n_ctx=1024, n_seq_max=4, n_batch=64, n_threads=2))
    yield loaded
    loaded.close()


def test_sequence_id_outside_the_pool_is_refused(engine: Engine) -> None:
    # In the per-sequence layout llama.cpp aborts the whole process on such an id (failed GGML_ASSERT).
    with pytest.raises(ValueError, match="outside"):
        engine.free_sequence(engine.n_seq_max)
    with pytest.raises(ValueError, match="outside"):
        engine.decode([BatchSlice(seq_id=engine.n_seq_max, tokens=[1], start_pos=0, sample=True)])


def test_batch_larger_than_n_batch_is_refused_before_it_is_written(engine: Engine) -> None:
    with pytest.raises(ValueError, match="exceeds n_batch"):
        engine.decode([BatchSlice(seq_id=0, tokens=[1] * 65, start_pos=0, sample=True)])
    assert engine.sequence_length(0) == 0


def test_window_is_n_ctx_over_sequences(engine: Engine) -> None:
    assert engine.window == 256


def test_chat_uses_the_template_in_the_gguf(engine: Engine) -> None:
    prompt = engine.render_chat([ChatMessage("user", "hello there")])
    assert "<|im_start|>user\nhello there<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_decode_and_free_leave_the_cache_empty(engine: Engine) -> None:
    tokens = engine.tokenize("The capital of France is")
    sampler = engine.new_sampler(SamplingParams(temperature=0.0), seed=0)
    try:
        (index,) = engine.decode([BatchSlice(seq_id=1, tokens=tokens, start_pos=0, sample=True)])
        token = engine.sample(sampler, index)
        assert engine.token_bytes(token).strip() == b"Paris"
        assert engine.sequence_length(1) == len(tokens)
    finally:
        engine.free_sampler(sampler)
        engine.free_sequence(1)
    assert engine.sequence_length(1) == 0


def test_no_kv_slot_is_a_decode_error_and_the_context_survives(model_path: Path) -> None:
    """llama_decode returns 1 when a batch does not fit; nothing is kept and the context goes on working."""
    small = Engine(EngineConfig(model_path=model_path, n_ctx=256, n_seq_max=1, n_batch=256, n_threads=2))
    try:
        small.decode([BatchSlice(seq_id=0, tokens=[1] * 200, start_pos=0, sample=False)])
        with pytest.raises(DecodeError) as caught:
            small.decode([BatchSlice(seq_id=0, tokens=[1] * 100, start_pos=200, sample=False)])
        assert caught.value.status == 1
        assert small.sequence_length(0) == 200
        small.free_sequence(0)
        small.decode([BatchSlice(seq_id=0, tokens=[1] * 100, start_pos=0, sample=False)])
        assert small.sequence_length(0) == 100
    finally:
        small.close()
