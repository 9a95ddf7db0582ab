"""Worker metrics expose what dashboards and alerts read; the health server answers probes; deploy configs are sound.

Fast: no model, no Redis.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from llamaq.worker.health_server import HealthServer
from llamaq.worker.metrics import METRIC_NAMES, WorkerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC_NAME = re.compile(r"\bllamaq_[a-z0-9_]+")


def samples(metrics: WorkerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, parsed back the way Prometheus reads it, by name and labels."""
    text = metrics.exposition().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    """The sample of that name whose labels are model=<metrics.model> plus labels."""
    return samples(metrics)[(name, frozenset({"model": metrics.model, **labels}.items()))]


def exercise(metrics: WorkerMetrics) -> None:
    """Call every update method once or twice, as a worker would."""
    metrics.observe_step(n_sequences=3, n_tokens=130, decode_s=0.02, step_s=0.025)
    metrics.observe_step(n_sequences=4, n_tokens=4, decode_s=0.01, step_s=0.012)
    metrics.observe_finished(
        "stop",
        None,
        prompt_tokens=100,
        cached_tokens=60,
        generation_tokens=3,
        queue_s=0.5,
        ttft_s=0.8,
        e2e_s=1.0,
        inter_token_s=[0.1, 0.1],
    )
    metrics.observe_finished(
        "error",
        "internal",
        prompt_tokens=20,
        cached_tokens=0,
        generation_tokens=0,
        queue_s=0.1,
        ttft_s=None,
        e2e_s=0.2,
        inter_token_s=[],
    )
    metrics.set_kv(cells_used=512, cells_total=2048, sequences_in_use=5, conversations_cached=2)
    metrics.set_queue(running=4, waiting=7)
    metrics.set_backlog(lag=12, pending=11)
    metrics.set_conversations_on_disk(9)
    metrics.count_eviction(2)
    metrics.count_preemption()
    metrics.count_swap_out()
    metrics.count_swap_in()
    metrics.count_restore_check_failure()
    metrics.count_restore_refused("corrupt")
    metrics.count_decode_retry()
    metrics.count_dropped("redis_error")
    metrics.count_redis_retry("OOM")
    metrics.count_dead_letter()
    metrics.count_resume_refused()
    metrics.count_state_dir_error("restore")
    metrics.count_lease_lapse()


def test_exposition_holds_what_the_worker_recorded() -> None:
    metrics = WorkerMetrics("smollm2", "host-1-abc", kv_layout="unified")
    exercise(metrics)

    assert value(metrics, "llamaq_requests_finished_total", reason="stop", code="") == 1
    assert value(metrics, "llamaq_requests_finished_total", reason="error", code="internal") == 1
    # Known outcomes exist at zero before they first happen, so ratios over them are defined.
    assert value(metrics, "llamaq_requests_finished_total", reason="length", code="") == 0
    assert value(metrics, "llamaq_requests_finished_total", reason="error", code="overloaded") == 0
    assert value(metrics, "llamaq_prompt_tokens_total") == 120
    assert value(metrics, "llamaq_prefix_cache_queries_total") == 120
    assert value(metrics, "llamaq_prefix_cache_hits_total") == 60
    assert value(metrics, "llamaq_generation_tokens_total") == 3
    assert value(metrics, "llamaq_time_to_first_token_seconds_count") == 1
    assert value(metrics, "llamaq_e2e_request_latency_seconds_count") == 2
    assert value(metrics, "llamaq_inter_token_latency_seconds_count") == 2
    assert value(metrics, "llamaq_inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert value(metrics, "llamaq_queue_time_seconds_bucket", le="0.5") == 2
    assert value(metrics, "llamaq_request_prompt_tokens_bucket", le="128.0") == 2
    assert value(metrics, "llamaq_batch_sequences_count") == 2
    assert value(metrics, "llamaq_batch_tokens_bucket", le="4.0") == 1
    assert value(metrics, "llamaq_batch_tokens_sum") == 134
    assert value(metrics, "llamaq_decode_step_seconds_sum") == pytest.approx(0.03)
    assert value(metrics, "llamaq_step_seconds_count") == 2
    assert value(metrics, "llamaq_kv_cells_used") == 512
    assert value(metrics, "llamaq_kv_cells_total") == 2048
    assert value(metrics, "llamaq_kv_usage_ratio") == 0.25
    assert value(metrics, "llamaq_sequences_in_use") == 5
    assert value(metrics, "llamaq_conversations_cached_kv") == 2
    assert value(metrics, "llamaq_conversations_on_disk") == 9
    assert value(metrics, "llamaq_requests_running") == 4
    assert value(metrics, "llamaq_requests_waiting") == 7
    assert value(metrics, "llamaq_stream_backlog") == 12
    assert value(metrics, "llamaq_stream_pending") == 11
    assert value(metrics, "llamaq_kv_evictions_total") == 2
    assert value(metrics, "llamaq_preemptions_total") == 1
    assert value(metrics, "llamaq_swap_out_total") == 1
    assert value(metrics, "llamaq_swap_in_total") == 1
    assert value(metrics, "llamaq_restore_check_failures_total") == 1
    assert value(metrics, "llamaq_restore_refused_total", reason="corrupt") == 1
    assert value(metrics, "llamaq_decode_retries_total") == 1
    assert value(metrics, "llamaq_requests_dropped_total", reason="redis_error") == 1
    assert value(metrics, "llamaq_requests_dropped_total", reason="lease_lost") == 0
    assert value(metrics, "llamaq_redis_retries_total", error="OOM") == 1
    assert value(metrics, "llamaq_dead_letters_total") == 1
    assert value(metrics, "llamaq_resumes_refused_total") == 1
    assert value(metrics, "llamaq_state_dir_errors_total", operation="restore") == 1
    assert value(metrics, "llamaq_state_dir_errors_total", operation="save") == 0
    assert value(metrics, "llamaq_lease_lapses_total") == 1
    assert value(metrics, "llamaq_worker_info", worker="host-1-abc", kv_layout="unified") == 1


def test_every_llamaq_sample_has_the_model_label_and_a_listed_name() -> None:
    metrics = WorkerMetrics("smollm2", "w", kv_layout="per-sequence")
    exercise(metrics)
    names = set()
    for name, labels in samples(metrics):
        if name.startswith("llamaq_"):
            assert ("model", "smollm2") in labels, name
            names.add(name)
    assert names <= METRIC_NAMES
    # Everything METRIC_NAMES promises shows up once used (`_created` only when prometheus_client writes it).
    assert {n for n in METRIC_NAMES if not n.endswith("_created")} <= names


def test_unknown_backlog_is_nan_not_a_number_alerts_match() -> None:
    metrics = WorkerMetrics("m", "w", kv_layout="unified")
    metrics.set_backlog(lag=None, pending=0)
    assert value(metrics, "llamaq_stream_backlog") != value(metrics, "llamaq_stream_backlog")


def test_instances_coexist_with_separate_values() -> None:
    first = WorkerMetrics("model-a", "w1", kv_layout="unified")
    second = WorkerMetrics("model-b", "w2", kv_layout="unified")
    first.count_preemption(3)
    assert value(first, "llamaq_preemptions_total") == 3
    assert value(second, "llamaq_preemptions_total") == 0
    assert b'model="model-a"' not in second.exposition()


# --- the health server --------------------------------------------------------------------------------------------


class Probes:
    """Liveness and readiness the test flips."""

    def __init__(self) -> None:
        self.alive = True
        self.ready: tuple[bool, str] = (False, "consumer group not joined")


@pytest.fixture
def served() -> Iterator[tuple[HealthServer, Probes]]:
    metrics = WorkerMetrics("smollm2", "w", kv_layout="unified")
    metrics.set_queue(running=2, waiting=1)
    probes = Probes()
    server = HealthServer(metrics, "127.0.0.1", 0, lambda: probes.alive, lambda: probes.ready)
    server.start()
    try:
        yield server, probes
    finally:
        server.stop()


def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def test_metrics_endpoint_serves_the_exposition(served: tuple[HealthServer, Probes]) -> None:
    server, _ = served
    assert server.port != 0
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST
    assert 'llamaq_requests_running{model="smollm2"} 2.0' in body
    assert {family.name for family in text_string_to_metric_families(body)} >= {"llamaq_requests_waiting"}


def test_healthz_follows_liveness(served: tuple[HealthServer, Probes]) -> None:
    server, probes = served
    assert get(server, "/healthz")[::2] == (200, "ok\n")
    probes.alive = False
    assert get(server, "/healthz")[0] == 503


def test_readyz_gives_the_reason_until_ready(served: tuple[HealthServer, Probes]) -> None:
    server, probes = served
    assert get(server, "/readyz")[::2] == (503, "consumer group not joined\n")
    probes.ready = (True, "ready")
    assert get(server, "/readyz")[::2] == (200, "ready\n")


def test_a_probe_that_raises_is_a_503(served: tuple[HealthServer, Probes]) -> None:
    server, _ = served

    def broken() -> tuple[bool, str]:
        raise ConnectionError("redis is gone")

    server.readiness = broken
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert "redis is gone" in body


def test_other_paths_are_404(served: tuple[HealthServer, Probes]) -> None:
    server, _ = served
    assert get(server, "/")[0] == 404
    assert get(server, "/metrics/extra")[0] == 404
    assert get(server, "/metrics?name[]=llamaq_requests_running")[0] == 200


def test_stop_releases_the_port() -> None:
    metrics = WorkerMetrics("m", "w", kv_layout="unified")
    with HealthServer(metrics, "127.0.0.1", 0, lambda: True, lambda: (True, "ready")) as server:
        port = server.port
        assert get(server, "/healthz")[0] == 200
    again = HealthServer(metrics, "127.0.0.1", port, lambda: True, lambda: (True, "ready"))
    again.start()
    again.stop()


# --- deploy configuration -----------------------------------------------------------------------------------------


def load_yaml(name: str) -> Any:
    """A file of deploy/ parsed as YAML."""
    return yaml.safe_load((DEPLOY / name).read_text())


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/alerts.yml."""
    groups = load_yaml("alerts.yml")["groups"]
    assert groups
    return [rule for group in groups for rule in group["rules"]]


def dashboard_targets() -> list[dict[str, Any]]:
    """Every query target of the Grafana dashboard."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [target for panel in dashboard["panels"] for target in panel.get("targets", [])]


def unknown_metrics(expr: str) -> set[str]:
    """llamaq_ names in a PromQL expression that no worker exports."""
    return {match.group() for match in METRIC_NAME.finditer(expr)} - METRIC_NAMES


def balanced(expr: str) -> bool:
    """True when (), [] and {} pair up in order, outside quoted strings."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote: str | None = None
    for char in expr:
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack and quote is None


def test_prometheus_config_scrapes_workers_and_loads_the_rules() -> None:
    config = load_yaml("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for static in jobs["llamaq-worker"]["static_configs"] for t in static["targets"]]
    assert targets and all(t.endswith(":9464") for t in targets)
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_rules_are_complete_and_use_exported_metrics() -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert "summary" in rule["annotations"]
        assert balanced(rule["expr"]), rule["alert"]
        assert not unknown_metrics(rule["expr"]), rule["alert"]
        assert METRIC_NAME.search(rule["expr"]) or re.search(r"\bup\b", rule["expr"]), rule["alert"]
    exprs = " ".join(rule["expr"] for rule in rules)
    for needed in ("llamaq_stream_backlog", "llamaq_kv_usage_ratio", "llamaq_requests_finished_total", "up{"):
        assert needed in exprs


def test_dashboard_queries_use_exported_metrics_through_a_datasource_variable() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert graphs and all(panel["targets"] for panel in graphs)
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in graphs)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for target in dashboard_targets():
        assert balanced(target["expr"]), target["expr"]
        assert not unknown_metrics(target["expr"]), target["expr"]
    exprs = " ".join(target["expr"] for target in dashboard_targets())
    for needed in (
        "rate(llamaq_generation_tokens_total",
        "llamaq_time_to_first_token_seconds_bucket",
        "llamaq_inter_token_latency_seconds_bucket",
        "llamaq_e2e_request_latency_seconds_bucket",
        "llamaq_kv_usage_ratio",
        "llamaq_batch_sequences_bucket",
        "llamaq_prefix_cache_hits_total",
        "llamaq_preemptions_total",
    ):
        assert needed in exprs


def test_a_connection_that_sends_nothing_is_closed_and_probes_still_answer() -> None:
    """Each connection holds a thread of the server: one that connects and says nothing (or half a request)
    must lose it after the socket timeout, not keep it for ever."""
    metrics = WorkerMetrics("m", "w", kv_layout="unified")
    with HealthServer(metrics, "127.0.0.1", 0, lambda: True, lambda: (True, "ready"), socket_timeout_s=0.5) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        halfway = socket.create_connection(("127.0.0.1", server.port))
        halfway.sendall(b"GET /heal")
        assert get(server, "/healthz")[0] == 200, "others are answered meanwhile"
        for connection in (silent, halfway):
            with connection:
                # Without a server-side timeout this recv waits its own 30 s out and raises TimeoutError.
                connection.settimeout(30)
                assert connection.recv(1024) == b"", "the server closed the connection"
