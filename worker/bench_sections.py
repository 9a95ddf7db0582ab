"""Two sections measured on a worker in this process against Redis: time to first token per turn of a long chat
(a named conversation against the stateless full history), and 16 chats sharing a long system prompt (KV cells
and time to first token with and without prefix reuse)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from llamaq.client import Client
from llamaq.protocol import DoneEvent, TokenEvent

from .service import Worker
from .settings import WorkerSettings

# Long user messages make the history reach ~1,500 tokens by turn 10 (as bench/conversation_turns.py).
DIARY = (
    "Here is more of my lighthouse diary; read it and answer briefly. The lamp was lit at dusk, the fog came "
    "in from the west, two fishing boats passed the rocks, and the bell rang through the night. "
) * 2
# About 1,000 tokens at 16 repeats (as bench/shared_prefix.py).
MUSEUM = (
    "You are the support assistant of a small lighthouse museum. Answer visitors briefly and kindly. "
    "The museum opens at nine and closes at five, every day but Monday. Tickets cost five euros; children "
    "enter free. The tower has 132 steps and a view over the whole bay. "
)


@contextlib.asynccontextmanager
async def in_process_worker(settings: WorkerSettings) -> AsyncIterator[Worker]:
    """A worker serving in this event loop (its engine on its own thread) until the block ends."""
    worker = Worker(settings, out=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        raise RuntimeError(f"worker stopped before it was ready: {task.result()!r}")
    try:
        yield worker
    finally:
        worker.request_stop()
        await task


async def timed_chat(client: Client, messages: list[dict[str, str]], **options: Any) -> tuple[dict[str, float], str]:
    """One streamed chat: TTFT seen by the client, the worker's own TTFT and token counts; and the reply."""
    sent = time.monotonic()
    first: float | None = None
    parts = []
    async for event in client.stream_chat(messages, **options):
        if isinstance(event, TokenEvent):
            if first is None and event.tokens:
                first = time.monotonic()
            parts.append(event.text)
        elif isinstance(event, DoneEvent):
            row = {
                "ttft_ms": round(((first or time.monotonic()) - sent) * 1000, 1),
                "worker_ttft_ms": event.timings.ttft_ms,
                "prompt_tokens": float(event.usage.prompt_tokens),
                "cached_tokens": float(event.usage.cached_tokens),
                "completion_tokens": float(event.usage.completion_tokens),
            }
            return row, "".join(parts)
    raise RuntimeError("the chat ended without a done event")


async def measure_turns(
    url: str, base: WorkerSettings, n_turns: int, repeats: int, max_tokens: int, step: Callable[[str], None]
) -> dict[str, Any]:
    """Per-turn TTFT (median over `repeats` chats): named conversation vs the whole history resent statelessly."""
    step("turns: named conversation")
    named = await _turns(
        url, replace(base, prefix="bturnsnamed", prefix_cache=True), n_turns, repeats, max_tokens, True
    )
    step("turns: stateless full history")
    stateless = await _turns(
        url, replace(base, prefix="bturnsstateless", prefix_cache=False), n_turns, repeats, max_tokens, False
    )
    return {"turns": n_turns, "repeats": repeats, "max_tokens": max_tokens, "named": named, "stateless": stateless}


async def _turns(
    url: str, settings: WorkerSettings, n_turns: int, repeats: int, max_tokens: int, named: bool
) -> list[dict[str, float]]:
    runs: list[list[dict[str, float]]] = []
    async with in_process_worker(settings), Client.from_url(url, prefix=settings.prefix) as client:
        # Warm-up: every first turn then finds the same template prefix cached (or, stateless, nothing).
        await client.chat([{"role": "user", "content": "Hello"}], max_tokens=2, temperature=0)
        for repeat in range(repeats):
            history: list[dict[str, str]] = []
            rows = []
            for turn in range(1, n_turns + 1):
                message = {"role": "user", "content": f"Diary {repeat}, turn {turn}. {DIARY}"}
                options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
                if named:
                    row, reply = await timed_chat(
                        client, [message], conversation=f"bench-turns-{repeat:04d}", append=True, **options
                    )
                else:
                    row, reply = await timed_chat(client, [*history, message], **options)
                history += [message, {"role": "assistant", "content": reply}]
                rows.append({"turn": float(turn), **row})
            runs.append(rows)
    return [
        {
            key: statistics.median(run[i][key] for run in runs)
            for key in ("turn", "ttft_ms", "worker_ttft_ms", "prompt_tokens", "cached_tokens")
        }
        for i in range(n_turns)
    ]


async def measure_shared_prefix(
    url: str,
    base: WorkerSettings,
    n_chats: int,
    system_repeats: int,
    max_tokens: int,
    step: Callable[[str], None],
) -> dict[str, Any]:
    """n_chats chats sharing a long system prompt, sent at once: prefill work, KV cells, TTFT; reuse on and off."""
    rows = {}
    for unified in (False, True):
        for reuse in (False, True):
            name = f"{'unified' if unified else 'per-sequence'}, prefix reuse {'on' if reuse else 'off'}"
            step(f"shared prefix: {name}")
            settings = replace(
                base,
                n_ctx=n_chats * 1280,
                parallel=n_chats,
                kv_unified=unified,
                prefix_cache=reuse,
                prefix=f"bsp{int(unified)}{int(reuse)}",
            )
            rows[name] = await _shared_prefix(url, settings, n_chats, MUSEUM * system_repeats, max_tokens)
    return {"chats": n_chats, "max_tokens": max_tokens, "rows": rows}


async def _shared_prefix(
    url: str, settings: WorkerSettings, n_chats: int, system: str, max_tokens: int
) -> dict[str, float]:
    per_cell = await _bytes_per_cell(url, settings, system) if settings.kv_unified else None
    async with in_process_worker(settings) as worker, Client.from_url(url, prefix=settings.prefix) as client:
        loop = worker.engine_loop
        assert loop is not None
        empty = loop.engine.state_bytes()
        decoded_before = loop.engine.tokens_decoded
        peak = [0.0]

        def cells() -> float:
            with loop.engine.lock:
                if per_cell is not None:
                    # Unified: copies share cells, so count them from the state size, which grows per cell held.
                    return (loop.engine.state_bytes() - empty) / per_cell
                return float(sum(loop.engine.sequence_length(i) for i in range(loop.engine.n_seq_max)))

        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], await asyncio.to_thread(cells))
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        chats = [
            [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: what about day {i}?"}]
            for i in range(n_chats)
        ]
        answers = await asyncio.gather(*(timed_chat(client, c, max_tokens=max_tokens, temperature=0) for c in chats))
        results = [row for row, _ in answers]
        watcher.cancel()
        await asyncio.sleep(0.2)
        held = cells()
        generated = sum(r["completion_tokens"] for r in results)
        # The last sampled token of each request is never fed back, so it costs no decode.
        prefill = loop.engine.tokens_decoded - decoded_before - (generated - len(results))
    return {
        "prompt_tokens_each": results[0]["prompt_tokens"],
        "prefill_tokens": float(prefill),
        "cached_tokens": sum(r["cached_tokens"] for r in results),
        "kv_cells_peak": round(max(peak[0], held)),
        "kv_cells_held_after": round(held),
        "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in results),
        "ttft_ms_max": max(r["ttft_ms"] for r in results),
    }


async def _bytes_per_cell(url: str, settings: WorkerSettings, system: str) -> float:
    """Growth of the serialised context state per KV cell held, calibrated on one sequence of known length."""
    calibration = replace(settings, prefix=settings.prefix + "cal", prefix_cache=True)
    async with in_process_worker(calibration) as worker, Client.from_url(url, prefix=calibration.prefix) as client:
        loop = worker.engine_loop
        assert loop is not None
        empty = loop.engine.state_bytes()
        await client.completion(system, max_tokens=1, temperature=0)
        await asyncio.sleep(0.2)
        with loop.engine.lock:
            held = sum(loop.kv.cells_held().values())
            return (loop.engine.state_bytes() - empty) / held
