"""Time to first token per turn of a long chat: a named conversation (KV kept between turns) against the
same chat sent statelessly to a worker that caches nothing (the whole history reprocessed every turn).
Writes bench/results/conversation_turns.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from llamaq.client import Client
from llamaq.worker.embedded_valkey import EmbeddedValkey
from llamaq.worker.service import Worker
from llamaq.worker.settings import WorkerSettings

TURNS = 10
# Long user messages make the history reach ~1,500 tokens by turn 10.
MESSAGE = (
    "Here is more of my lighthouse diary; read it and answer briefly. The lamp was lit at dusk, the fog came "
    "in from the west, two fishing boats passed the rocks, and the bell rang through the night. "
) * 2


async def run_turns(url: str, prefix: str, named: bool) -> list[dict[str, float]]:
    settings = WorkerSettings(redis_url=url, n_ctx=8192, parallel=4, prefix=prefix, prefix_cache=named)
    worker = Worker(settings, out=open("/dev/null", "w"))  # noqa: SIM115
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    await ready.wait()
    rows = []
    history: list[dict[str, str]] = []
    try:
        async with Client.from_url(url, prefix=prefix) as client:
            for turn in range(1, TURNS + 1):
                message = {"role": "user", "content": f"Turn {turn}. {MESSAGE}"}
                if named:
                    result = await client.chat(
                        [message], conversation="bench-chat", append=True, max_tokens=32, temperature=0
                    )
                else:
                    result = await client.chat([*history, message], max_tokens=32, temperature=0)
                history += [message, {"role": "assistant", "content": result.text}]
                rows.append(
                    {
                        "turn": turn,
                        "prompt_tokens": result.usage.prompt_tokens,
                        "cached_tokens": result.usage.cached_tokens,
                        "ttft_ms": result.timings.ttft_ms,
                    }
                )
    finally:
        worker.request_stop()
        await task
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with EmbeddedValkey() as valkey:
        named = await run_turns(valkey.url, "turnsnamed", named=True)
        stateless = await run_turns(valkey.url, "turnsstateless", named=False)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversation_turns.json").write_text(json.dumps({"named": named, "stateless": stateless}, indent=2))
    lines = [
        "Per-turn time to first token, 10-turn chat, 32 tokens per reply",
        "",
        "| turn | history tokens | named conversation TTFT (ms) | cached | stateless full history TTFT (ms) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(named, stateless, strict=True):
        lines.append(
            f"| {a['turn']} | {a['prompt_tokens']:.0f} | {a['ttft_ms']:.0f} | {a['cached_tokens']:.0f} | "
            f"{b['ttft_ms']:.0f} | {b['ttft_ms'] / a['ttft_ms']:.1f} |"
        )
    ratio = named[-1]["ttft_ms"] / named[0]["ttft_ms"]
    lines += ["", f"Named conversation: turn {TURNS} TTFT / turn 1 TTFT = {ratio:.2f}"]
    (args.out / "conversation_turns.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
