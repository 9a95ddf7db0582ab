"""`llamaq demo`: embedded Valkey, a worker process and 8 users x 3 turns; exits 0 and leaves nothing running."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.slow


def embedded_valkey_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "llamaq-valkey-" in " ".join(p.info["cmdline"] or [])}


def test_demo_completes_every_conversation_and_cleans_up() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    valkeys_before = embedded_valkey_pids()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamaq.worker.cli",
            "demo",
            "--users",
            "8",
            "--turns",
            "3",
            "--max-tokens",
            "8",
            "--n-ctx",
            "8192",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 users, 24 requests, 0 errors" in result.stdout
    assert "time to first token: p50" in result.stdout
    assert "worker exited with code 0" in result.stdout
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"processes left behind: {[p.cmdline() for p in leftovers]}"
    assert embedded_valkey_pids() <= valkeys_before, "the demo's Valkey outlived it"
