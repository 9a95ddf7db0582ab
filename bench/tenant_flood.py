"""One tenant floods the queue; how long does another tenant's request wait for its first token?

A worker (4 sequences, 4 waiting; one llama.cpp thread, which stays steady on a shared machine) serves a flood
of FLOOD requests from tenant `flood`, which resubmits whatever the queue refuses (wait_if_overloaded). Once the
flood is queued, tenant `calm` sends one request; its time to first token is measured at the client, from
submit to its first token event (so its time in the Redis stream counts), in seconds and in the worker's decode
steps meanwhile (which a shared, noisy machine does not change). Rounds alternate between a worker without
per-tenant limits and one with them, each on a fresh key prefix; a last round measures the calm request with no
flood at all.

    .venv/bin/python bench/tenant_flood.py [--rounds 2] [--out bench/results/tenant_flood.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from llamaq.client import Client
from llamaq.protocol import TokenEvent
from llamaq.worker.embedded_valkey import EmbeddedValkey
from llamaq.worker.service import Worker
from llamaq.worker.settings import WorkerSettings

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
FLOOD = 32
FLOOD_TOKENS = 16
MODES = {
    "no per-tenant limits": {"max_tenant_in_flight": 0, "max_tenant_backlog": 0},
    "in flight 12, backlog 4": {"max_tenant_in_flight": 12, "max_tenant_backlog": 4},
}


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings) -> AsyncIterator[Worker]:
    """A worker serving in this event loop until the block ends."""
    worker = Worker(settings, out=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(on_ready=ready.set))
    await ready.wait()
    try:
        yield worker
    finally:
        worker.request_stop()
        await task


def steps(worker: Worker) -> float:
    """Decode steps the worker has run."""
    metrics = worker.metrics
    assert metrics is not None
    return metrics.registry.get_sample_value("llamaq_step_seconds_count", {"model": metrics.model}) or 0.0


async def calm_ttft(client: Client, worker: Worker) -> tuple[float, float]:
    """Time to first token of one request of tenant `calm`: seconds, and the worker's decode steps meanwhile."""
    started, steps_before = time.monotonic(), steps(worker)
    handle = await client.submit(prompt=COUNTING, max_tokens=4, temperature=0, tenant="calm")
    async with handle:
        async for event in handle:
            if isinstance(event, TokenEvent):
                ttft = time.monotonic() - started, steps(worker) - steps_before
                break
        await handle.result()
    return ttft


async def one_round(url: str, limits: dict[str, int] | None) -> tuple[float, float]:
    """The calm tenant's TTFT beside a flood (limits given) or alone (None)."""
    prefix = f"flood{secrets.token_hex(3)}"
    settings = WorkerSettings(
        redis_url=url,
        n_ctx=4096,
        parallel=4,
        max_waiting=4,
        n_batch=256,
        prefix=prefix,
        metrics_port=None,
        **(limits or {}),  # type: ignore[arg-type]
    )
    async with running_worker(settings) as worker, Client.from_url(url, prefix=prefix) as client:
        if limits is None:
            return await calm_ttft(client, worker)

        async def flood_one() -> None:
            options = {"tenant": "flood", "wait_if_overloaded": True, "deadline_s": 900.0}
            handle = await client.submit(prompt=COUNTING, max_tokens=FLOOD_TOKENS, temperature=0, **options)  # type: ignore[arg-type]
            async with handle:
                await handle.result()

        async with anyio.create_task_group() as group:
            for _ in range(FLOOD):
                group.start_soon(flood_one)
            await anyio.sleep(1.0)  # the flood is queued (or waiting for room)
            result = await calm_ttft(client, worker)
            group.cancel_scope.cancel()
        return result


async def main(rounds: int, out: Path) -> None:
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*MODES, "no flood"]}
    with EmbeddedValkey() as valkey:
        for _ in range(rounds):
            for name, limits in MODES.items():
                results[name].append(await one_round(valkey.url, limits))
                print(name, results[name], flush=True)
        results["no flood"].append(await one_round(valkey.url, None))
    lines = [
        f"# Another tenant's TTFT while one tenant floods ({FLOOD} requests of {FLOOD_TOKENS} tokens)",
        "",
        f"{time.strftime('%Y-%m-%d')}, worker with 4 sequences and 4 waiting, {rounds} alternated rounds.",
        "",
        "| worker | calm TTFT median (s) | max (s) | decode steps before its first token, median |",
        "|---|---|---|---|",
    ]
    for name, measured in results.items():
        seconds, counted = [m[0] for m in measured], [m[1] for m in measured]
        lines.append(
            f"| {name} | {statistics.median(seconds):.2f} | {max(seconds):.2f} | {statistics.median(counted):.0f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tenant_flood.md"))
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.out))
