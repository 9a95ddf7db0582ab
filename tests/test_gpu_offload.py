"""Full GPU offload: the worker serves with every layer and the KV cache on the GPU, and we measure how far
batched greedy text agrees with solo runs there (GPU kernels differ from the CPU ones the invariance was shown on).

Skipped unless llama-cpp-python was built with GPU support and a device is present; results land in
bench/results/agreement-gpu-*.json and are recorded in docs/gpu-runs.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import llama_cpp
import pytest

from .conftest import assert_kv_cache_accounted, running_worker, wait_until_idle, worker_settings
from .greedy_reference import PROMPTS, concurrent_texts, record_agreement, solo_llama_texts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="llama-cpp-python has no GPU offload"),
]

ALL_LAYERS = 999


@pytest.mark.parametrize(
    ("name", "unified", "kv_type"),
    [
        ("gpu-per-sequence-q8_0", False, "q8_0"),
        ("gpu-per-sequence-f16", False, "f16"),
        ("gpu-unified-q8_0", True, "q8_0"),
    ],
)
async def test_full_offload_serves_and_agreement_is_measured(
    redis_url: str, model_path: Path, prefix: str, name: str, unified: bool, kv_type: str
) -> None:
    from llamaq.worker.engine import KvType

    kv = KvType(kv_type)
    settings = worker_settings(
        redis_url,
        model_path,
        prefix,
        n_ctx=8192,
        parallel=8,
        n_batch=128,
        kv_unified=unified,
        kv_type=kv,
        n_gpu_layers=ALL_LAYERS,
    )
    async with running_worker(settings) as worker:
        batched = await concurrent_texts(redis_url, prefix, PROMPTS, seed=1)
        await wait_until_idle(worker)
        assert_kv_cache_accounted(worker)
    solo = await anyio.to_thread.run_sync(solo_llama_texts, model_path, PROMPTS, kv.ggml_type, ALL_LAYERS)
    assert all(batched) and all(solo)
    record_agreement(name, batched, solo)


def test_restore_with_full_offload_reproduces_the_saved_logits(model_path: Path, tmp_path: Path) -> None:
    """State save and verified restore with every layer and the KV cache on the GPU, where restores have been
    seen to lose the KV. Records the largest logit difference a restore showed (bench/results/restore-gpu.json);
    a file whose cells hold other KV must still fail the check."""
    from llamaq.worker.engine import BatchSlice, Engine, EngineConfig
    from llamaq.worker.model_files import model_digest
    from llamaq.worker.settings import WorkerSettings
    from llamaq.worker.state_dir import StateDir, StateKind
    from llamaq.worker.state_file import Fingerprint, StateRefused, decode_state, encode_state
    from llamaq.worker.swap_tier import SwapTier, logits_difference

    tolerance = WorkerSettings().restore_tolerance
    engine = Engine(EngineConfig(model_path, n_ctx=4096, n_seq_max=4, n_batch=256, n_gpu_layers=ALL_LAYERS))
    try:
        fingerprint = Fingerprint.of(model_digest(model_path), **engine.config.kv_settings())
        tier = SwapTier(engine, StateDir(tmp_path, 1 << 30), fingerprint, tolerance)
        differences = []
        for words in (20, 200, 600):
            tokens = engine.tokenize("The lamp was lit at dusk and the fog came in. " * (words // 10))
            for start in range(0, len(tokens), 256):
                engine.decode([BatchSlice(1, tokens[start : start + 256], start, False)])
            tier.save(1, tokens, "gpu-conversation", StateKind.SWAP)
            engine.free_sequence(1)
            data = tier.states.read("gpu-conversation", StateKind.SWAP)
            assert data is not None
            record = decode_state(data, fingerprint)
            assert engine.restore_sequence_state(2, record.payload)
            differences.append(logits_difference(engine.next_token_logits(2, tokens), record.logits))
            engine.free_sequence(2)
            saved = tier.find("gpu-conversation", tokens)
            assert saved is not None
            tier.restore(2, "gpu-conversation", saved, keep=len(tokens))  # passes the check at the default tolerance
            engine.free_sequence(2)
        history = tokens[:256]
        engine.decode([BatchSlice(1, history, 0, False)])
        tier.save(1, history, "gpu-conversation", StateKind.SAVED)
        honest = tier.states.read("gpu-conversation", StateKind.SAVED)
        assert honest is not None
        wrong = engine.tokenize("A ship was lost at sea in the night. " * 40)[:256]
        engine.decode([BatchSlice(3, wrong, 0, False)])
        wrong_kv = bytes(engine.sequence_state(3))
        logits = decode_state(honest, fingerprint).logits
        impostor = encode_state("gpu-conversation", history, fingerprint, wrong_kv, logits)
        tier.states.write("gpu-conversation", StateKind.SAVED, impostor)
        saved = tier.find("gpu-conversation", history)
        assert saved is not None
        with pytest.raises(StateRefused):
            tier.restore(2, "gpu-conversation", saved, keep=256)
        assert tier.check_failures == 1
    finally:
        engine.close()
    out = Path(__file__).resolve().parent.parent / "bench" / "results" / "restore-gpu.json"
    out.write_text(json.dumps({"max_logit_difference": differences, "tolerance": tolerance}, indent=2) + "\n")
