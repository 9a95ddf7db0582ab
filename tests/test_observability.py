"""What an operator sees of a real worker: /metrics agrees with what clients were told, the probes answer, the
heartbeat lets `llamaq status` list the worker from Redis alone, and disk-tier events are counted."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from llamaq.client import Client, RequestFailed
from llamaq.protocol import ErrorCode, Keys, owned_conversation, owner_of
from llamaq.worker.service import Worker
from llamaq.worker.state_dir import StateKind
from llamaq.worker.state_file import decode_state, encode_state
from llamaq.worker.status import collect_status

from .conftest import running_worker, scrape_samples, wait_until_idle, worker_settings

pytestmark = pytest.mark.slow


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def scrape(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics, by name and labels (without `model`)."""
    assert worker.health_port is not None
    return await anyio.to_thread.run_sync(scrape_samples, worker.health_port)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_metrics_probes_and_status_describe_the_worker(redis_url: str, model_path: Path, prefix: str) -> None:
    settings = worker_settings(redis_url, model_path, prefix, parallel=2)
    async with running_worker(settings) as worker, Client.from_url(redis_url, prefix=prefix) as client:
        assert worker.health_port is not None
        assert await anyio.to_thread.run_sync(http_get, worker.health_port, "/healthz") == (200, "ok\n")
        results = [await client.chat(chat(f"Name a colour, {i}."), max_tokens=8, temperature=0) for i in range(3)]
        with pytest.raises(RequestFailed) as too_long:
            await client.chat(chat("hi"), max_tokens=4000)  # more than a 2,048-cell window
        assert too_long.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
        await wait_until_idle(worker)
        status = await collect_status(redis_url, Keys(prefix))
        command = [sys.executable, "-m", "llamaq.worker.cli", "status", "--redis-url", redis_url, "--prefix", prefix]
        printed = await anyio.run_process(command)
        ready = await anyio.to_thread.run_sync(http_get, worker.health_port, "/readyz")
        samples = await scrape(worker)
    assert ready[0] == 200
    table = printed.stdout.decode()
    assert settings.consumer[:40] in table and "0 waiting for a worker" in table and "/4096" in table
    assert [w["worker"] for w in status["workers"]] == [settings.consumer]
    row = status["workers"][0]
    assert row["model"] == model_path.stem and row["parallel"] == 2 and row["kv_cells_total"] == 4096
    finished = {labels: v for (name, labels), v in samples.items() if name == "llamaq_requests_finished_total"}
    assert sum(finished.values()) == 4
    assert finished[(("code", "context_length_exceeded"), ("reason", "error"))] == 1
    assert samples[("llamaq_prompt_tokens_total", ())] == sum(r.usage.prompt_tokens for r in results)
    assert samples[("llamaq_generation_tokens_total", ())] == sum(r.usage.completion_tokens for r in results)
    assert samples[("llamaq_prefix_cache_hits_total", ())] == sum(r.usage.cached_tokens for r in results)
    assert samples[("llamaq_time_to_first_token_seconds_count", ())] == 3
    assert samples[("llamaq_inter_token_latency_seconds_count", ())] > 0
    assert samples[("llamaq_batch_sequences_count", ())] > 0
    assert samples[("llamaq_kv_cells_total", ())] == 4096
    assert samples[("llamaq_requests_running", ())] == 0
    # The heartbeat is removed when the worker stops: status sees no live worker at once.
    assert (await collect_status(redis_url, Keys(prefix)))["workers"] == []


async def test_swaps_refusals_and_failed_restore_checks_are_counted(
    redis_url: str, model_path: Path, prefix: str, tmp_path: Path
) -> None:
    """A conversation swapped out and back, one whose file fails the logits check (the recorded logits are
    not what its KV gives), and one whose file is corrupt: each shows up in its counter."""
    settings = worker_settings(redis_url, model_path, prefix, parallel=2, state_dir=tmp_path, swap_min_tokens=16)

    def system(name: str) -> dict[str, str]:
        # Each conversation its own opening, so neither finds the other's KV as a shared prefix.
        return {"role": "system", "content": f"{name}. " + "You are a lighthouse keeper; answer in a sentence. " * 6}

    async with running_worker(settings) as worker, Client.from_url(redis_url, prefix=prefix) as client:
        loop = worker.engine_loop
        assert loop is not None and loop.state is not None
        firsts = {}
        for name in ("counted-good", "counted-bad"):
            firsts[name] = await client.chat([system(name), *chat(f"{name}?")], conversation=name, max_tokens=8)
        # Both idle conversations are evicted to disk by two others that need both ids.
        async with anyio.create_task_group() as group:
            for name in ("evictor-one", "evictor-two"):
                group.start_soon(lambda n=name: client.chat(chat(n), conversation=n, max_tokens=4))
        fingerprint = loop.state.swap.fingerprint
        owner = owner_of(None, client.client_id)  # the client's conversations' folder and id qualifier
        data = (tmp_path / owner / "counted-bad.swap.llqs").read_bytes()
        record = decode_state(data, fingerprint)
        wrong_logits = bytes(b ^ 0x01 for b in record.logits)
        bad = owned_conversation(owner, "counted-bad")
        forged = encode_state(
            bad, list(record.header.tokens), fingerprint, record.payload, wrong_logits, record.header.cache_domain
        )
        loop.state.swap.states.write(bad, StateKind.SWAP, forged)
        (tmp_path / owner / "counted-ghost.swap.llqs").write_bytes(data[:20])  # even its header is cut
        outcomes = {}
        for name in ("counted-good", "counted-bad"):
            history = [system(name), *chat(f"{name}?"), {"role": "assistant", "content": firsts[name].text}]
            outcomes[name] = await client.chat([*history, *chat("And then?")], conversation=name, max_tokens=8)
        await client.chat(chat("ghost"), conversation="counted-ghost", max_tokens=4)
        await wait_until_idle(worker)
        await worker_tick(worker)
        samples = await scrape(worker)
    assert outcomes["counted-good"].usage.prefix_source == "disk"
    assert outcomes["counted-bad"].usage.prefix_source == "recompute"
    assert samples[("llamaq_swap_out_total", ())] >= 2
    assert samples[("llamaq_swap_in_total", ())] == 1
    assert samples[("llamaq_restore_check_failures_total", ())] == 1
    refused = {labels: v for (name, labels), v in samples.items() if name == "llamaq_restore_refused_total"}
    assert refused[(("reason", "failed_check"),)] == 1 and refused[(("reason", "truncated"),)] == 1
    assert samples[("llamaq_kv_evictions_total", ())] >= 2
    assert samples[("llamaq_conversations_on_disk", ())] >= 1


async def worker_tick(worker: Worker) -> None:
    """Run one monitor pass now instead of waiting for the next heartbeat."""
    assert worker.monitor is not None
    await worker.monitor.tick()
