"""Worker metrics expose what dashboards and alerts read; the health server answers probes; deploy configs are sound:
every metric and label an alert, a recording rule or a dashboard query names is one the code exports, and the
recording rules give vLLM's names to the worker's series.

Fast: no model, no Redis. With promtool installed, the rules are also checked and evaluated by Prometheus's own.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from llamaq.worker.health_server import DEFAULT_PORT, HealthServer
from llamaq.worker.metrics import METRIC_NAMES, WorkerMetrics

from . import promql
from .exported_metrics import GATEWAY_JOB, WORKER_JOB, Series, exercise_worker, exported, problems, with_recorded

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


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


def test_exposition_holds_what_the_worker_recorded() -> None:
    metrics = WorkerMetrics("smollm2", "host-1-abc", kv_layout="unified")
    exercise_worker(metrics)

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
    exercise_worker(metrics)
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

# vLLM's names that deploy/vllm-rules.yml provides: vLLM's metric type (its "Production Metrics" docs and
# vllm/v1/metrics/loggers.py) and the worker metric each is made from. Histograms are named without a suffix.
VLLM_NAMES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": ("gauge", "llamaq_requests_running"),
    "vllm:num_requests_waiting": ("gauge", "llamaq_requests_waiting"),
    "vllm:kv_cache_usage_perc": ("gauge", "llamaq_kv_usage_ratio"),
    "vllm:gpu_cache_usage_perc": ("gauge", "llamaq_kv_usage_ratio"),
    "vllm:prompt_tokens_total": ("counter", "llamaq_prompt_tokens_total"),
    "vllm:generation_tokens_total": ("counter", "llamaq_generation_tokens_total"),
    "vllm:prefix_cache_queries_total": ("counter", "llamaq_prefix_cache_queries_total"),
    "vllm:prefix_cache_hits_total": ("counter", "llamaq_prefix_cache_hits_total"),
    "vllm:num_preemptions_total": ("counter", "llamaq_preemptions_total"),
    "vllm:request_success_total": ("counter", "llamaq_requests_finished_total"),
    "vllm:time_to_first_token_seconds": ("histogram", "llamaq_time_to_first_token_seconds"),
    "vllm:inter_token_latency_seconds": ("histogram", "llamaq_inter_token_latency_seconds"),
    "vllm:time_per_output_token_seconds": ("histogram", "llamaq_inter_token_latency_seconds"),
    "vllm:e2e_request_latency_seconds": ("histogram", "llamaq_e2e_request_latency_seconds"),
    "vllm:request_queue_time_seconds": ("histogram", "llamaq_queue_time_seconds"),
    "vllm:request_prompt_tokens": ("histogram", "llamaq_request_prompt_tokens"),
    "vllm:request_generation_tokens": ("histogram", "llamaq_request_generation_tokens"),
    "vllm:iteration_tokens_total": ("histogram", "llamaq_batch_tokens"),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# vLLM's finished_reason values (stop, length, abort, error, repetition) for the worker's `reason` label.
VLLM_FINISHED_REASON = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
# Refused before they were served: vLLM answers these with a 400 before its engine sees them.
NOT_SERVED_CODES = {"invalid_request", "context_length_exceeded"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus); the rules are parsed only"
)


def load_yaml(name: str) -> Any:
    """A file of deploy/ parsed as YAML."""
    return yaml.safe_load((DEPLOY / name).read_text())


def rules(name: str) -> list[dict[str, Any]]:
    """Every rule of a rule file of deploy/."""
    groups = load_yaml(name)["groups"]
    assert groups
    return [rule for group in groups for rule in group["rules"]]


def rule_files() -> list[str]:
    """The rule files deploy/prometheus.yml loads."""
    files: list[str] = load_yaml("prometheus.yml")["rule_files"]
    return files


def known_series() -> dict[str, Series]:
    """What the code exports, plus what the recording rules make of it."""
    return with_recorded(exported(), rules("vllm-rules.yml"))


def dashboard() -> dict[str, Any]:
    """deploy/grafana-dashboard.json."""
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return loaded


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets, and the selector of each label_values() variable."""
    board = dashboard()
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]+)\)", variable["definition"])
            assert found is not None, variable["definition"]
            # The label listed counts as one the query groups by: it must exist on the metric.
            queries.append(f"count by ({found[2]}) ({found[1]})")
    return queries


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


@functools.cache
def source_samples() -> tuple[tuple[str, dict[str, str], float], ...]:
    """A worker's exposition as Prometheus stores it: target labels added, empty labels dropped (no label)."""
    metrics = WorkerMetrics("smollm2", "host-1-abc", kv_layout="per-sequence", process_metrics=False)
    exercise_worker(metrics)
    return tuple(
        (name, {k: v for k, v in labels.items() if v} | {"job": WORKER_JOB, "instance": "worker-0"}, value)
        for name, labels, value in (
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
        )
    )


def vllm_source(record: str) -> tuple[str, str]:
    """vLLM's metric type of a recorded series and the worker series it must be made from, by VLLM_NAMES."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = record.removesuffix(suffix)
        if base != record and VLLM_NAMES.get(base, ("",))[0] == "histogram":
            return "histogram", VLLM_NAMES[base][1] + suffix
    kind, source = VLLM_NAMES[record]
    return kind, source


def expected_vllm_samples(record: str) -> list[tuple[dict[str, str], float]]:
    """What vLLM's series `record` should hold for the worker of source_samples(), from VLLM_NAMES alone."""
    _, source = vllm_source(record)
    expected = []
    for name, labels, value in source_samples():
        if name != source or labels.get("code") in NOT_SERVED_CODES:
            continue
        extra = {"model_name": labels["model"]}
        if record == "vllm:request_success_total":
            extra["finished_reason"] = VLLM_FINISHED_REASON[labels["reason"]]
        expected.append((labels | extra, value))
    assert expected, f"no sample of {source}"
    return expected


def evaluate_copy_rule(expr: str) -> list[tuple[dict[str, str], float]]:
    """A recording rule of vllm-rules.yml's form (label_replace calls around one selector) evaluated in Python on
    source_samples(), as Prometheus would: the selector's matchers, then each label_replace from the inside out."""
    query = promql.parse(expr)
    (selector,) = query.selectors
    assert query.functions <= {"label_replace"}, f"not a copy of one series: {expr}"
    results = []
    for name, labels, value in source_samples():
        if name != selector.metric or not all(m.accepts(labels.get(m.label, "")) for m in selector.matchers):
            continue
        labels = dict(labels)
        for destination, replacement, source, regex in reversed(query.replacements):
            found = re.fullmatch(regex, labels.get(source, ""))
            if found is not None:
                labels[destination] = found.expand(re.sub(r"\$(\d+)", r"\\g<\1>", replacement))
        results.append(({k: v for k, v in labels.items() if v}, value))
    return results


def by_labels(found: list[tuple[dict[str, str], float]]) -> dict[frozenset[tuple[str, str]], float]:
    """Samples keyed by their label set."""
    return {frozenset(labels.items()): value for labels, value in found}


def series_text(name: str, labels: dict[str, str]) -> str:
    """A series as promtool's test files write it: name{label="value",...}."""
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def promtool(*arguments: str | Path) -> None:
    """Run promtool; fail the test with its output when it does."""
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *map(str, arguments)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_workers_and_loads_the_rules() -> None:
    config = load_yaml("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for static in jobs[WORKER_JOB]["static_configs"] for t in static["targets"]]
    assert targets and all(t.endswith(f":{DEFAULT_PORT}") for t in targets)
    assert GATEWAY_JOB in jobs
    assert config["rule_files"] == ["alerts.yml", "vllm-rules.yml"]
    assert all((DEPLOY / name).is_file() for name in config["rule_files"])


def test_alert_rules_are_complete_and_use_exported_metrics() -> None:
    known = known_series()
    groups = {group["name"]: group["rules"] for group in load_yaml("alerts.yml")["groups"]}
    assert set(groups) == {"llamaq-worker", "llamaq-gateway"}
    for rule in rules("alerts.yml"):
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert "summary" in rule["annotations"]
        assert balanced(rule["expr"]), rule["alert"]
        assert promql.parse(rule["expr"]).metrics, rule["alert"]
        assert problems(rule["expr"], known) == [], rule["alert"]
    exprs = " ".join(rule["expr"] for rule in rules("alerts.yml"))
    for needed in (
        "llamaq_stream_backlog",
        "llamaq_kv_usage_ratio",
        "llamaq_requests_finished_total",
        'up{job="llamaq-worker"}',
        'up{job="llamaq-gateway"}',
        'llamaq_gateway_requests_total{status=~"5.."}',
        'llamaq_gateway_requests_total{status="503"}',
        "llamaq_gateway_time_to_first_byte_seconds_bucket",
    ):
        assert needed in exprs


def test_dashboard_queries_use_exported_metrics_through_a_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert graphs and all(panel["targets"] for panel in graphs)
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in graphs)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    known = known_series()
    for query in dashboard_queries():
        assert balanced(query), query
        assert problems(query, known) == [], query
    exprs = " ".join(dashboard_queries())
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


def test_dashboard_has_a_gateway_row_and_resource_panels() -> None:
    board = dashboard()
    rows: dict[str, list[str]] = {}
    for panel in board["panels"]:
        if panel["type"] == "row":
            rows[panel["title"]] = []
        else:
            rows[list(rows)[-1]].extend(target["expr"] for target in panel["targets"])
    gateway = " ".join(rows["Gateway"])
    for needed in (
        "sum by (status) (rate(llamaq_gateway_requests_total",
        'status="429"',
        'status="503"',
        'status=~"5.."',
        "histogram_quantile(0.95, sum by (le, stream) (rate(llamaq_gateway_time_to_first_byte_seconds_bucket",
        "llamaq_gateway_open_streams",
    ):
        assert needed in gateway
    assert all(f'job="{GATEWAY_JOB}"' in expr for expr in rows["Gateway"])
    # Each resource panel shows both kinds of process.
    resources = [promql.parse(expr) for expr in rows["Resources"]]
    shown = {
        (selector.metric, matcher.value)
        for query in resources
        for selector in query.selectors
        for matcher in selector.matchers
        if matcher.label == "job"
    }
    for metric in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert {(metric, WORKER_JOB), (metric, GATEWAY_JOB)} <= shown


def test_recording_rules_provide_vllm_names_types_and_labels() -> None:
    recorded = {rule["record"]: rule for rule in rules("vllm-rules.yml")}
    assert all("alert" not in rule for rule in rules("vllm-rules.yml"))
    expected = {
        name + suffix
        for name, (kind, _) in VLLM_NAMES.items()
        for suffix in (HISTOGRAM_SUFFIXES if kind == "histogram" else ("",))
    }
    assert set(recorded) == expected
    known = known_series()
    exporting = exported()
    for record, rule in recorded.items():
        assert problems(rule["expr"], exporting) == [], record
        (source,) = promql.parse(rule["expr"]).metrics
        kind, expected_source = vllm_source(record)
        assert source == expected_source, record
        # A gauge stays a gauge, a counter a counter, a histogram's bucket a bucket: rate() and quantiles work.
        assert exporting[source].kind == kind, record
        needed = {"model_name"} | ({"le"} if record.endswith("_bucket") else set())
        assert needed <= known[record].labels, record
    assert {"finished_reason"} <= known["vllm:request_success_total"].labels


def test_recording_rules_copy_every_worker_sample_with_vllm_labels() -> None:
    # Every reason the worker reports maps to one of vLLM's.
    reasons = {labels["reason"] for name, labels, _ in source_samples() if name == "llamaq_requests_finished_total"}
    assert reasons == set(VLLM_FINISHED_REASON)
    assert set(VLLM_FINISHED_REASON.values()) <= {"stop", "length", "abort", "error", "repetition"}
    for rule in rules("vllm-rules.yml"):
        assert by_labels(evaluate_copy_rule(rule["expr"])) == by_labels(expected_vllm_samples(rule["record"]))


@needs_promtool
def test_promtool_accepts_the_rules_and_both_prometheus_configs(tmp_path: Path) -> None:
    promtool("check", "rules", *(DEPLOY / name for name in rule_files()))
    promtool("check", "config", DEPLOY / "prometheus.yml")
    (config_map,) = [
        doc
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / "prometheus-config.yaml").read_text())
        if doc["kind"] == "ConfigMap"
    ]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    for name in rule_files():
        shutil.copy(DEPLOY / name, tmp_path / name)
    assert config["rule_files"] == rule_files()
    if not promtool_knows_kubernetes_sd(tmp_path):
        # Debian builds promtool without Kubernetes discovery: check all the rest of the file.
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs"), job["job_name"]
            job["static_configs"] = [{"targets": []}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", tmp_path / "prometheus.yml")


def promtool_knows_kubernetes_sd(tmp_path: Path) -> bool:
    """Whether this promtool was built with Kubernetes service discovery."""
    probe = tmp_path / "kubernetes-sd.yml"
    probe.write_text(
        yaml.safe_dump({"scrape_configs": [{"job_name": "p", "kubernetes_sd_configs": [{"role": "pod"}]}]})
    )
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "config", str(probe)], capture_output=True, text=True, timeout=60)
    return "field kubernetes_sd_configs not found" not in result.stdout + result.stderr


@needs_promtool
def test_promtool_evaluates_the_vllm_rules_on_a_worker_exposition(tmp_path: Path) -> None:
    sources = {source for rule in rules("vllm-rules.yml") for source in promql.parse(rule["expr"]).metrics}
    tests = {
        "interval": "1m",
        "input_series": [
            {"series": series_text(name, labels), "values": f"{value!r}x3"}
            for name, labels, value in source_samples()
            if name in sources
        ],
        "promql_expr_test": [
            {
                "expr": rule["record"],
                "eval_time": "2m",
                "exp_samples": [
                    {"labels": series_text(rule["record"], labels), "value": value}
                    for labels, value in expected_vllm_samples(rule["record"])
                ],
            }
            for rule in rules("vllm-rules.yml")
        ],
    }
    test_file = tmp_path / "vllm-rules.test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(DEPLOY / "vllm-rules.yml")], "tests": [tests]}))
    promtool("test", "rules", test_file)


def gateway_requests(status: str, per_minute: int) -> dict[str, str]:
    """A gateway's request counter for one status, growing steadily, as promtool input."""
    labels = {"job": GATEWAY_JOB, "instance": "gateway-0", "endpoint": "/v1/chat/completions", "tenant": "anonymous"}
    return {
        "series": series_text("llamaq_gateway_requests_total", labels | {"status": status}),
        "values": f"0+{per_minute}x40",
    }


def firing(alert: str, severity: str, **labels: str) -> dict[str, Any]:
    """A promtool expression test: the alert fires at 30m with these labels."""
    alert_labels = {"alertname": alert, "alertstate": "firing", "severity": severity, "job": GATEWAY_JOB} | labels
    return {
        "expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}',
        "eval_time": "30m",
        "exp_samples": [{"labels": series_text("ALERTS", alert_labels), "value": 1}],
    }


def silent(alert: str) -> dict[str, Any]:
    """A promtool expression test: the alert does not fire at 30m."""
    return {"expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}', "eval_time": "30m", "exp_samples": []}


@needs_promtool
def test_promtool_fires_the_gateway_alerts_when_they_should(tmp_path: Path) -> None:
    worker_up = {"series": series_text("up", {"job": WORKER_JOB, "instance": "worker-0"}), "values": "1x40"}
    worker_gone = worker_up | {"values": "0x40"}
    ttfb = "llamaq_gateway_time_to_first_byte_seconds_bucket"
    slow_stream = {"job": GATEWAY_JOB, "instance": "gateway-0", "endpoint": "/v1/chat/completions", "stream": "true"}
    outage = {
        "interval": "1m",
        # 20% of answers are 503 and no worker is up.
        "input_series": [gateway_requests("200", 240), gateway_requests("503", 60), worker_gone],
        "promql_expr_test": [
            firing("LlamaqGatewayServerErrors", "critical"),
            firing("LlamaqGatewayNoWorker", "critical"),
            silent("LlamaqGatewayOverloaded"),
        ],
    }
    busy = {
        "interval": "1m",
        # Workers are up but cannot keep up: 5% of calls refused with 429, streams wait 10 to 20 s for a byte, and
        # 1% of answers are 503 (a worker restarting mid-call).
        "input_series": [
            gateway_requests("200", 564),
            gateway_requests("429", 30),
            gateway_requests("503", 6),
            gateway_requests("499", 600),
            worker_up,
            {"series": series_text(ttfb, slow_stream | {"le": "10.0"}), "values": "0x40"},
            {"series": series_text(ttfb, slow_stream | {"le": "20.0"}), "values": "0+60x40"},
            {"series": series_text(ttfb, slow_stream | {"le": "+Inf"}), "values": "0+60x40"},
        ],
        "promql_expr_test": [
            firing("LlamaqGatewayOverloaded", "warning"),
            firing("LlamaqGatewaySlowFirstByte", "warning", endpoint="/v1/chat/completions"),
            silent("LlamaqGatewayServerErrors"),
            silent("LlamaqGatewayNoWorker"),
        ],
    }
    idle = {
        "interval": "1m",
        # No worker and no caller: LlamaqNoWorker's business; the gateway turns nobody away.
        "input_series": [gateway_requests("200", 0), worker_gone],
        "promql_expr_test": [silent("LlamaqGatewayNoWorker"), silent("LlamaqGatewayServerErrors")],
    }
    test_file = tmp_path / "alerts.test.yml"
    scenarios = [outage, busy, idle]
    test_file.write_text(
        yaml.safe_dump({"rule_files": [str(DEPLOY / "alerts.yml")], "evaluation_interval": "1m", "tests": scenarios})
    )
    promtool("test", "rules", test_file)


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
