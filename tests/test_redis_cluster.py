"""A real 3-primary Valkey cluster on loopback: workers and clients on `redis+cluster://`, requests, a named
conversation and a worker restart across it, and keys of different clients spread over the shards."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from llamaq.client import Client
from llamaq.worker.embedded_valkey import free_port, valkey_bin_dir

from .conftest import running_worker, worker_settings

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def valkey_cluster(n_primaries: int = 3) -> Iterator[list[int]]:
    """Three cluster-enabled valkey-servers joined by `valkey-cli --cluster create`; their ports."""
    directory = Path(tempfile.mkdtemp(prefix="llamaq-cluster-"))
    ports = [cluster_port() for _ in range(n_primaries)]
    processes = []
    try:
        for port in ports:
            node_dir = directory / str(port)
            node_dir.mkdir()
            command = [str(valkey_bin_dir() / "valkey-server"), "--port", str(port), "--bind", "127.0.0.1"]
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", str(node_dir)]
            command += ["--save", "", "--appendonly", "no"]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            wait_for_ping(port)
        nodes = [f"127.0.0.1:{port}" for port in ports]
        create = ["--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(
            [str(valkey_bin_dir() / "valkey-cli"), *create],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while cluster_state(ports[0]) != "ok":
            assert time.monotonic() < deadline, "cluster did not become ok"
            time.sleep(0.2)
        yield ports
    finally:
        for process in processes:
            process.kill()
            process.wait()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            return port


def cluster_state(port: int) -> str:
    info = redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER INFO")
    return str(info.get("cluster_state") if isinstance(info, dict) else "")


def wait_for_ping(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            return
        except redis.ConnectionError:
            assert time.monotonic() < deadline, f"valkey on {port} did not start"
            time.sleep(0.05)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_requests_conversations_and_a_worker_restart_across_a_cluster(model_path: Path, prefix: str) -> None:
    with valkey_cluster() as ports:
        url = f"redis+cluster://127.0.0.1:{ports[0]}/0"
        settings = worker_settings(url, model_path, prefix)
        async with Client.from_url(url, prefix=prefix) as first, Client.from_url(url, prefix=prefix) as second:
            async with running_worker(settings):
                one = await first.chat(chat("Name a colour."), max_tokens=8, temperature=0)
                two = await second.chat(chat("Name a colour."), max_tokens=8, temperature=0)
                turn1 = await first.chat(
                    chat("Tell me about owls."), conversation="cluster-chat", append=True, max_tokens=16
                )
            async with running_worker(settings):  # a restarted worker: the history lives in the cluster
                turn2 = await first.chat(chat("And their eyes?"), conversation="cluster-chat", append=True)
                history = await first.get_conversation("cluster-chat")
            slots = {
                redis.RedisCluster(host="127.0.0.1", port=ports[0]).keyslot(first.keys.reply(client.client_id, "x"))
                for client in (first, second)
            }
    assert one.text == two.text and one.usage.completion_tokens > 0
    assert turn1.text and turn2.text
    assert [m["role"] for m in history["messages"]] == ["user", "assistant", "user", "assistant"]
    assert len(slots) == 2, "two clients' reply streams live in different slots"
