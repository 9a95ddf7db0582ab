"""Greedy reference runs: prompts in flight together through a worker, and each alone through `Llama`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anyio

from llamaq.client import Client

from .conftest import REPO
from .prompts import LONG_PROMPT, SHORT_PROMPTS

MAX_TOKENS = 40
PROMPTS = [*SHORT_PROMPTS[:7], LONG_PROMPT]


def solo_llama_texts(model_path: Path, prompts: list[str], kv_type: int, n_gpu_layers: int = 0) -> list[str]:
    """Each prompt alone through llama-cpp-python's high-level API with the worker's attention and KV settings."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model_path),
        n_gpu_layers=n_gpu_layers,
        n_ctx=2048,
        n_threads=2,
        flash_attn=True,
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
        seed=0,
    )
    try:
        texts = []
        for prompt in prompts:
            result = llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
            texts.append(result["choices"][0]["text"])  # type: ignore[index]
        return texts
    finally:
        llm.close()


async def concurrent_texts(url: str, prefix: str, prompts: list[str], seed: int) -> list[str]:
    """All prompts in flight at once, arriving at random staggered times."""
    rng = random.Random(seed)
    texts = [""] * len(prompts)
    async with Client.from_url(url, prefix=prefix) as client:

        async def one(index: int, delay_s: float) -> None:
            await anyio.sleep(delay_s)
            result = await client.completion(prompts[index], max_tokens=MAX_TOKENS, temperature=0.0)
            texts[index] = result.text

        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(one, index, rng.uniform(0.0, 1.5))
    return texts


def record_agreement(name: str, batched: list[str], solo: list[str]) -> int:
    """Count requests whose batched text equals their solo text; keep the count under bench/results."""
    agree = sum(got == want for got, want in zip(batched, solo, strict=True))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    record = {"setting": name, "agree": agree, "of": len(solo)}
    (out / f"agreement-{name}.json").write_text(json.dumps(record) + "\n")
    print(f"{name}: {agree}/{len(solo)} requests equal their solo run")
    return agree
