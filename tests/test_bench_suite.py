"""`llamaq bench --quick` end to end on the systems that need no llama-server, and the benchmark's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaq.worker.bench_batch_order import id_runs, inversion_share, order_summary
from llamaq.worker.bench_load import Trace
from llamaq.worker.bench_requests import load_requests, poisson_arrivals
from llamaq.worker.bench_serve_metrics import keep_up, saturation, saturation_rate, serving_metrics
from llamaq.worker.bench_suite import main


def _trace(index: int, sent: float, token_gaps: list[float], first_after: float) -> Trace:
    trace = Trace(index, sent)
    at = sent + first_after
    trace.token_times.append(at)
    for gap in token_gaps:
        at += gap
        trace.token_times.append(at)
    trace.done_at, trace.n_tokens = at, len(token_gaps) + 1
    return trace


def test_serving_metrics_follow_vllm_definitions() -> None:
    traces = [_trace(0, 0.0, [0.1, 0.1, 0.1], 0.5), _trace(1, 1.0, [0.2], 0.3)]
    row = serving_metrics(traces, {0: 10, 1: 20})
    assert row["completed"] == 2 and row["failed"] == 0
    assert row["duration_s"] == pytest.approx(1.5)  # first send to the last final event
    assert row["request_throughput"] == pytest.approx(2 / 1.5, abs=1e-3)
    assert row["output_throughput"] == pytest.approx(6 / 1.5, abs=1e-2)
    assert row["total_token_throughput"] == pytest.approx(36 / 1.5, abs=1e-2)
    # TPOT = (E2E - TTFT) / (output tokens - 1): 0.3 s / 3 and 0.2 s / 1.
    assert row["p50_tpot_ms"] == pytest.approx(150.0)
    assert row["mean_ttft_ms"] == pytest.approx(400.0)
    assert row["p50_itl_ms"] == pytest.approx(100.0)  # four gaps: 100, 100, 100, 200
    assert row["p99_itl_ms"] == pytest.approx(197.0)


def test_keep_up_tells_a_system_that_falls_behind() -> None:
    arrivals = [i * 0.5 for i in range(40)]
    # Keeps up: every request takes 2 s. Falls behind: served one per second, in order of arrival.
    steady = [_trace(i, at, [], 2.0) for i, at in enumerate(arrivals)]
    behind = [_trace(i, at, [], max(1.0 + i * 1.0 - at, 0.1)) for i, at in enumerate(arrivals)]
    assert keep_up(steady) == pytest.approx(1.0, abs=0.02)
    assert keep_up(behind) == pytest.approx(0.5, abs=0.05)
    assert saturation({"keep_up": keep_up(behind), "p99_ttft_ms": 10.0}, 5000.0) == ["keep_up"]
    assert saturation({"keep_up": 1.0, "p99_ttft_ms": 6000.0, "failed": 1}, 5000.0) == ["ttft", "failed"]
    rows = {"0.5": {"saturated": False}, "1": {"saturated": False}, "2": {"saturated": True}}
    assert saturation_rate(rows) == (1.0, 2.0)


def test_batch_order_summary_counts_ascending_steps() -> None:
    assert inversion_share((0, 1, 2, 3)) == 0.0
    assert inversion_share((3, 2, 1, 0)) == 1.0
    assert (id_runs((0, 1, 2)), id_runs((0, 2, 3)), id_runs((2, 1, 0)), id_runs((4,))) == (1, 2, 3, 1)
    calls = [(9, (0, 1, 2)), (3, (2, 0, 1)), (3, (2, 0, 1)), (3, (0, 1, 2)), (2, (0, 1))]
    summary = order_summary(calls, 3)
    assert summary["decode_steps"] == 3 and summary["decode_steps_ascending"] == 1
    assert summary["decode_steps_one_run"] == 1 and summary["decode_id_runs_mean"] == pytest.approx(5 / 3, abs=0.01)
    assert summary["decode_orders"][0] == {"ids": [2, 0, 1], "steps": 2}
    assert summary["other_steps"] == 2 and summary["ids_used"] == [0, 1, 2]


def test_the_shipped_request_set_and_arrivals_are_fixed() -> None:
    requests = load_requests()
    assert len(requests) >= 200
    assert all(r.max_tokens >= 1 and r.messages[-1][0] == "user" for r in requests)
    assert poisson_arrivals(5, 2.0, seed=1) == poisson_arrivals(5, 2.0, seed=1)
    gaps = poisson_arrivals(2000, 4.0, seed=2)
    assert gaps[0] == 0.0 and gaps[-1] / len(gaps) == pytest.approx(0.25, rel=0.1)


@pytest.mark.slow
def test_quick_throughput_writes_json_and_markdown(redis_url: str, tmp_path: Path) -> None:
    argv = ["--quick", "--only", "throughput", "--systems", "redis,engine", "--skip-llama-server"]
    argv += ["--redis-url", redis_url, "--out", str(tmp_path)]
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
    targets = {row["target"]: row for row in results["targets"]}
    engine = targets["at 4 clients: llamaq via Redis >= 95% of llamaq engine in-process"]
    assert engine["status"] in ("PASS", "MISS") and engine["value"] > 0
    assert targets["at 16 clients: llamaq via Redis >= 1.15x llama-server tokens/s"]["status"] == "n/a"
    report = (tmp_path / "bench.md").read_text()
    assert report.startswith("# llamaq benchmark") and "| target |" in report and "llamaq via Redis" in report


@pytest.mark.slow
def test_quick_engine_limit_open_loop_and_round_trips(redis_url: str, tmp_path: Path) -> None:
    argv = ["--quick", "--only", "engine_limit,serve,round_trips", "--skip-llama-server", "--limit-sizes", "3"]
    argv += ["--redis-url", redis_url, "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    limit = results["engine_limit"]["rows"]
    assert set(limit) == {"per-sequence/3", "unified/3"}
    for row in limit.values():
        bare = row["bare loop"]
        assert bare["batch_order"]["decode_steps"] == bare["decode_steps"] > 0
        assert bare["batch_order"]["decode_steps_one_run"] == bare["decode_steps"]  # ids 0..n-1 in order
        for system in ("engine, prefix cache on", "engine, prefix cache off"):
            # Same greedy tokens, so the same lengths, where batched output equals solo (per-sequence layout).
            if row["layout"] == "per-sequence":
                assert row[system]["generated"] == bare["generated"]
            assert row[system]["decode_tokens_per_s_vs_bare"] > 0
    serve = results["serve"]["systems"]["llamaq via Redis"]
    (run,) = serve["by_rate"].values()
    assert run["completed"] == run["requests"] >= 6 and run["p99_ttft_ms"] > 0 and run["keep_up"] is not None
    trips = results["round_trips"]["rows"]["4"]
    assert trips["steps"] > 0 and trips["worker_round_trips_by_first_command"].get("XADD", 0) > 0
    report = (tmp_path / "bench.md").read_text()
    assert "## Engine limit" in report and "## Open loop" in report and "## Redis round trips" in report
