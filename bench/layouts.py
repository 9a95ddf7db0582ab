"""KV layout trade-off, measured: throughput, time to first token and prefill speed of each layout.

Runs a worker in-process against an embedded Valkey and drives it through the real client. Writes
bench/results/layouts.json and layouts.md. Usage: python bench/layouts.py [--out DIR] [--tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from llamaq.client import Client
from llamaq.worker.embedded_valkey import EmbeddedValkey
from llamaq.worker.engine import KvType
from llamaq.worker.service import Worker
from llamaq.worker.settings import WorkerSettings

PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a robot who learns to paint.",
    "List five facts about the planet Mars:\n1.",
    "def quicksort(items):\n",
    "The best way to learn a musical instrument is",
    "Explain why the sky is blue.",
    "A good breakfast includes",
    "In the year 2050, cities will",
]
LONG_PROMPT = "The lighthouse keeper climbed the stairs and polished the lens. " * 60 + "Then"


@dataclass(frozen=True)
class Layout:
    name: str
    unified: bool
    kv_type: KvType


LAYOUTS = [
    Layout("per-sequence q8_0 (default)", False, KvType.Q8_0),
    Layout("per-sequence f16", False, KvType.F16),
    Layout("unified q8_0", True, KvType.Q8_0),
]


async def measure(url: str, layout: Layout, tokens: int) -> dict[str, float]:
    prefix = "bench" + layout.name.split()[0].replace("-", "") + layout.kv_type.value.replace("_", "")
    settings = WorkerSettings(
        redis_url=url,
        n_ctx=16384,
        parallel=8,
        n_batch=512,
        kv_unified=layout.unified,
        kv_type=layout.kv_type,
        prefix=prefix,
    )
    worker = Worker(settings, out=open("/dev/null", "w"))  # noqa: SIM115
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    await ready.wait()
    try:
        async with Client.from_url(url, prefix=prefix) as client:
            await client.completion("Warm up", max_tokens=4, temperature=0)
            started = time.perf_counter()
            solo = [await client.completion(p, max_tokens=tokens, temperature=0) for p in PROMPTS[:3]]
            solo_s = time.perf_counter() - started
            started = time.perf_counter()
            batch = await asyncio.gather(*(client.completion(p, max_tokens=tokens, temperature=0) for p in PROMPTS))
            batch_s = time.perf_counter() - started
            long = await client.completion(LONG_PROMPT, max_tokens=1, temperature=0)
    finally:
        worker.request_stop()
        await task
    return {
        "tokens_per_s_1_stream": sum(r.usage.completion_tokens for r in solo) / solo_s,
        "tokens_per_s_8_streams": sum(r.usage.completion_tokens for r in batch) / batch_s,
        "ttft_ms_p50_8_streams": statistics.median(r.timings.ttft_ms for r in batch),
        "prefill_tokens_per_s": long.usage.prompt_tokens / (long.timings.ttft_ms / 1000),
        "long_prompt_tokens": long.usage.prompt_tokens,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    results = {}
    with EmbeddedValkey() as valkey:
        for layout in LAYOUTS:
            print(f"measuring {layout.name} ...", flush=True)
            results[layout.name] = await measure(valkey.url, layout, args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layouts.json").write_text(json.dumps(results, indent=2) + "\n")
    base = results[LAYOUTS[0].name]
    lines = [
        f"KV layouts, SmolLM2-135M-Instruct Q4_1, {args.tokens} tokens per request, greedy, through Redis",
        "",
        "| layout | 1 stream tok/s | 8 streams tok/s | TTFT p50 at 8 (ms) | prefill tok/s | 8-stream ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = r["tokens_per_s_8_streams"] / base["tokens_per_s_8_streams"]
        lines.append(
            f"| {name} | {r['tokens_per_s_1_stream']:.0f} | {r['tokens_per_s_8_streams']:.0f} | "
            f"{r['ttft_ms_p50_8_streams']:.0f} | {r['prefill_tokens_per_s']:.0f} | {ratio:.2f} |"
        )
    (args.out / "layouts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
