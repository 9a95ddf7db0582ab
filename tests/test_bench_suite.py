"""`llamaq bench --quick` end to end on its two cheapest systems: llamaq through Redis and its engine in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaq.worker.bench_suite import main

pytestmark = pytest.mark.slow


def test_quick_throughput_writes_json_and_markdown(redis_url: str, tmp_path: Path) -> None:
    argv = ["--quick", "--only", "throughput", "--systems", "redis,engine", "--skip-llama-server"]
    argv += ["--client-processes", "2", "--redis-url", redis_url, "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"meta", "plan", "throughput", "targets"} <= results.keys()
    assert results["meta"]["commit"] and results["meta"]["model"].endswith(".gguf")
    throughput = results["throughput"]
    assert throughput["clients"] == [1, 4]
    for system in ("llamaq via Redis", "llamaq engine in-process"):
        for clients in ("1", "4"):
            row = throughput["systems"][system]["by_clients"][clients]
            assert row["errors"] == 0, row
            for key in ("tokens_per_s", "tokens", "ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95"):
                assert row[key] > 0, (system, clients, key, row)
    ratio = results["targets"][0]
    assert ratio["status"] in ("PASS", "MISS") and ratio["value"] > 0
    report = (tmp_path / "bench.md").read_text()
    assert report.startswith("# llamaq benchmark") and "| target |" in report and "llamaq via Redis" in report
