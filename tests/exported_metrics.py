"""The metrics the code exports, read off its real registries (worker/metrics.py, client/gateway_metrics.py): every
sample name with the labels it carries, its type and the scrape job that collects it. Alert rules, recording rules
and dashboard queries in deploy/ are checked against this, so a name or label the code does not export fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llamaq.client.gateway_metrics import GatewayMetrics
from llamaq.protocol import Usage
from llamaq.worker.metrics import METRIC_NAMES, WorkerMetrics

from .promql import parse

WORKER_JOB = "llamaq-worker"
GATEWAY_JOB = "llamaq-gateway"
TARGET_LABELS = frozenset({"job", "instance"})
"""What Prometheus adds to every scraped sample (the scrape configs' relabelings set instance, nothing more)."""


@dataclass(frozen=True)
class Series:
    """What one sample name carries: its labels, its metric type, the jobs that scrape it."""

    labels: frozenset[str]
    kind: str
    jobs: frozenset[str]


def exercise_worker(metrics: WorkerMetrics) -> None:
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


def exercise_gateway(metrics: GatewayMetrics) -> None:
    """Answer, stream and bill a few calls, as a gateway would."""
    metrics.observe_request("/v1/chat/completions", 200, "team-a")
    metrics.observe_request("/v1/chat/completions", 503, "anonymous")
    metrics.observe_first_byte("/v1/chat/completions", True, 0.3)
    metrics.observe_first_byte("/v1/completions", False, 2.0)
    metrics.open_streams.inc()
    metrics.observe_usage("team-a", Usage(prompt_tokens=12, completion_tokens=5, cached_tokens=4))


def exposition_samples(exposition: bytes) -> Iterable[tuple[str, dict[str, str], str]]:
    """(sample name, labels, metric type) of every sample, parsed back the way Prometheus reads it."""
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            yield sample.name, sample.labels, family.type


def exported() -> dict[str, Series]:
    """Every sample name a worker or a gateway exports, Prometheus's own `up` included."""
    worker = WorkerMetrics("smollm2", "host-1-abc", kv_layout="per-sequence")
    exercise_worker(worker)
    gateway = GatewayMetrics()
    exercise_gateway(gateway)
    series: dict[str, Series] = {"up": Series(TARGET_LABELS, "gauge", frozenset({WORKER_JOB, GATEWAY_JOB}))}
    for job, metrics in ((WORKER_JOB, worker), (GATEWAY_JOB, gateway)):
        for name, labels, kind in exposition_samples(metrics.exposition()):
            known = series.get(name, Series(TARGET_LABELS, kind, frozenset()))
            series[name] = Series(known.labels | labels.keys(), kind, known.jobs | {job})
    worker_names = {name for name, s in series.items() if name.startswith("llamaq_") and WORKER_JOB in s.jobs}
    # The exercise reaches every metric the worker defines: none is missing for lack of a sample.
    assert {n for n in METRIC_NAMES if not n.endswith("_created")} <= worker_names <= METRIC_NAMES
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= series.keys()
    return series


def with_recorded(series: dict[str, Series], rules: Iterable[dict[str, Any]]) -> dict[str, Series]:
    """The series plus those the recording rules make: a rule's output carries its sources' labels and jobs, and
    the labels its label_replace calls add."""
    extended = dict(series)
    for rule in rules:
        if "record" not in rule:
            continue
        query = parse(rule["expr"])
        sources = [series[metric] for metric in query.metrics]
        kinds = {source.kind for source in sources}
        assert len(kinds) == 1, f"{rule['record']} mixes metric types {kinds}"
        labels = frozenset().union(*(s.labels for s in sources)) | query.added_labels
        extended[rule["record"]] = Series(labels, kinds.pop(), frozenset().union(*(s.jobs for s in sources)))
    return extended


def problems(expr: str, known: dict[str, Series]) -> list[str]:
    """What the expression names that nothing exports: metrics, labels, or a job that does not scrape a metric."""
    query = parse(expr)
    found = [f"unknown metric {m}" for m in sorted(query.metrics - known.keys())]
    selected = [(s, known[s.metric]) for s in query.selectors if s.metric in known]
    available = frozenset().union(*(series.labels for _, series in selected)) | query.added_labels
    for selector, series in selected:
        for matcher in selector.matchers:
            if matcher.label not in series.labels | {"__name__"}:
                found.append(f"{selector.metric} has no label {matcher.label}")
            elif matcher.label == "job" and not any(matcher.accepts(job) for job in series.jobs):
                found.append(f"{selector.metric} is not scraped by job {matcher.op}{matcher.value!r}")
    for label in sorted(query.grouping_labels - available):
        found.append(f"no selected metric has the label {label} it groups or matches on")
    for _, _, source, _ in query.replacements:
        if source and source not in available:
            found.append(f"label_replace reads {source}, which no selected metric has")
    return found
