"""Full GPU offload: the worker serves with every layer and the KV cache on the GPU, and we measure how far
batched greedy text agrees with solo runs there (GPU kernels differ from the CPU ones the invariance was shown on).

Skipped unless llama-cpp-python was built with GPU support and a device is present; results land in
bench/results/agreement-gpu-*.json and are recorded in docs/gpu-runs.md.
"""

from __future__ import annotations

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
