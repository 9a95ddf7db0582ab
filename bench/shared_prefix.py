"""16 conversations sharing a ~1,000-token system prompt: prefill tokens and KV cells, with and without
prefix reuse, in both KV layouts. Writes bench/results/shared_prefix.json and .md.

Prefill tokens are counted by the engine (tokens fed to llama_decode minus tokens generated). Cells: in the
per-sequence layout each stream stores its own copy, so cells are the sum of the sequences' lengths; in the
unified layout copies share cells, so they are measured from llama.cpp's serialised state size, which grows
by a fixed number of bytes per cell in use (calibrated on a sequence of known length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import replace
from pathlib import Path

from llamaq.client import Client
from llamaq.worker.embedded_valkey import EmbeddedValkey
from llamaq.worker.service import Worker
from llamaq.worker.settings import WorkerSettings

SYSTEM = (
    "You are the support assistant of a small lighthouse museum. Answer visitors briefly and kindly. "
    "The museum opens at nine and closes at five, every day but Monday. Tickets cost five euros; children "
    "enter free. The tower has 132 steps and a view over the whole bay. "
) * 16
QUESTIONS = [f"Question {i}: what should I know about visiting on day {i}?" for i in range(16)]
MAX_TOKENS = 16


async def run_worker(settings: WorkerSettings) -> tuple[Worker, asyncio.Task[int]]:
    worker = Worker(settings, out=open("/dev/null", "w"))  # noqa: SIM115
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    await ready.wait()
    return worker, task


async def bytes_per_cell(settings: WorkerSettings, url: str) -> tuple[int, float]:
    """Serialised state size of an empty context, and its growth per cell held."""
    worker, task = await run_worker(replace(settings, prefix="calibrate", prefix_cache=True))
    loop = worker.engine_loop
    assert loop is not None
    empty = loop.engine.state_bytes()
    async with Client.from_url(url, prefix="calibrate") as client:
        await client.completion(SYSTEM, max_tokens=1, temperature=0)
    await asyncio.sleep(0.2)
    with loop.engine.lock:
        held = sum(loop.kv.cells_held().values())
        grown = loop.engine.state_bytes() - empty
    worker.request_stop()
    await task
    return empty, grown / held


async def measure(url: str, unified: bool, reuse: bool) -> dict[str, float]:
    prefix = f"sp{int(unified)}{int(reuse)}"
    settings = WorkerSettings(
        redis_url=url,
        n_ctx=16 * 1280,
        parallel=16,
        n_batch=512,
        kv_unified=unified,
        prefix_cache=reuse,
        prefix=prefix,
    )
    empty, per_cell = await bytes_per_cell(settings, url) if unified else (0, 0.0)
    worker, task = await run_worker(settings)
    loop = worker.engine_loop
    assert loop is not None
    decoded_before = loop.engine.tokens_decoded
    async with Client.from_url(url, prefix=prefix) as client:
        results = await asyncio.gather(
            *(
                client.chat(
                    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                for q in QUESTIONS
            )
        )
    await asyncio.sleep(0.2)
    with loop.engine.lock:
        generated = sum(r.usage.completion_tokens for r in results)
        # The last sampled token of each request is never fed back, so it costs no decode.
        prefill = loop.engine.tokens_decoded - decoded_before - (generated - len(results))
        if unified:
            cells = (loop.engine.state_bytes() - empty) / per_cell
        else:
            cells = sum(loop.engine.sequence_length(i) for i in range(loop.engine.n_seq_max))
    worker.request_stop()
    await task
    return {
        "prompt_tokens_each": results[0].usage.prompt_tokens,
        "prefill_tokens": prefill,
        "cached_tokens": sum(r.usage.cached_tokens for r in results),
        "kv_cells": round(cells),
        "ttft_ms_p50": statistics.median(r.timings.ttft_ms for r in results),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = {}
    with EmbeddedValkey() as valkey:
        for unified in (False, True):
            for reuse in (False, True):
                name = f"{'unified' if unified else 'per-sequence'}, prefix reuse {'on' if reuse else 'off'}"
                print(f"measuring {name} ...", flush=True)
                rows[name] = await measure(valkey.url, unified, reuse)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_prefix.json").write_text(json.dumps(rows, indent=2) + "\n")
    first = next(iter(rows.values()))
    lines = [
        f"16 chats sharing a system prompt; {first['prompt_tokens_each']} prompt tokens each, "
        f"{MAX_TOKENS} generated, all sent at once",
        "",
        "| setting | prefill tokens | cached tokens | KV cells held after | TTFT p50 (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['prefill_tokens']:.0f} | {r['cached_tokens']:.0f} | {r['kv_cells']:.0f} | "
            f"{r['ttft_ms_p50']:.0f} |"
        )
    (args.out / "shared_prefix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
