"""Every Prometheus metric of a worker, in one place, with the few calls the worker makes to update them.

Names follow what operators of vLLM and llama.cpp's server know (requests running and waiting, time to first token,
inter-token latency, prefix cache queries and hits, KV usage), prefixed `llamaq_`. Each metric carries a `model`
label, fixed per WorkerMetrics; Prometheus adds `instance` and `job` when it scrapes, so the worker's own id (a
fresh consumer name per process) appears only on `llamaq_worker_info`, keeping series from churning on restarts.

Each WorkerMetrics owns its CollectorRegistry rather than using the process-wide default, so tests (and a process
that hosts several workers) can create as many as they like without duplicate-registration errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest

from llamaq.protocol import ErrorCode, FinishReason

_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    120.0,
)
"""From a 1 ms decode step of a small model to a two-minute generation on a CPU."""
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(16))
"""1 to 32768 tokens: prompts and replies up to the largest context a worker is likely to get."""
_BATCH_SEQUENCE_BUCKETS = tuple(float(2**i) for i in range(10))
"""1 to 512 sequences in one step."""
_BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(14))
"""1 to 8192 tokens in one step: the step budget (--n-batch, 512 by default) may be raised well above 512."""

ERROR = "error"
"""The `reason` label of a request that ended with an error event (the others are FinishReason values)."""

DROPPED_REDIS_ERROR = "redis_error"
"""A request whose own reply stream refused writes (a client replaced the key): no event could reach it."""
DROPPED_LEASE_LOST = "lease_lost"
"""A request another worker took over while this one's heartbeat lease had lapsed."""
STATE_DIR_OPERATIONS = ("save", "restore", "delete", "list")
"""The `operation` label of llamaq_state_dir_errors_total."""

# Samples Prometheus exposes per metric type, as prometheus_client writes them (`_created` unless disabled).
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


class WorkerMetrics:
    """The metrics of one worker on their own registry; every update method is safe to call from any thread."""

    def __init__(self, model: str, worker: str, *, kv_layout: str, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            # Resident memory and CPU time, as the default registry would have them (nothing on non-Linux).
            ProcessCollector(registry=self.registry)
        self.model = model
        self._define_info(worker, kv_layout)
        self._define_gauges()
        self._define_counters()
        self._define_histograms()

    # --- what the worker calls ----------------------------------------------------------------------------

    def observe_step(self, n_sequences: int, n_tokens: int, decode_s: float, step_s: float, id_runs: int = 1) -> None:
        """Record one decode step: sequences and tokens in the batch, llama_decode time, whole step time, and runs
        of consecutive sequence ids in the batch (each a pass over the weights in the per-sequence layout)."""
        self.batch_id_runs.observe(id_runs)
        self.batch_sequences.observe(n_sequences)
        self.batch_tokens.observe(n_tokens)
        self.decode_step_seconds.observe(decode_s)
        self.step_seconds.observe(step_s)

    def observe_finished(
        self,
        reason: str,
        code: str | None,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        generation_tokens: int,
        queue_s: float,
        ttft_s: float | None,
        e2e_s: float,
        inter_token_s: Iterable[float],
    ) -> None:
        """Record a request's end: reason is a FinishReason value or "error" (then code is its ErrorCode).

        Token counters move here, at the end, so they always equal the usage clients were told; a long
        generation therefore shows up in rate() when it ends rather than spread over its lifetime.
        ttft_s is None when no token was sampled (cancelled or failed before its first token).
        """
        self.requests_finished.labels(model=self.model, reason=reason, code=code or "").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        self.queue_time_seconds.observe(queue_s)
        if ttft_s is not None:
            self.time_to_first_token_seconds.observe(ttft_s)
        self.e2e_request_latency_seconds.observe(e2e_s)
        for gap_s in inter_token_s:
            self.inter_token_latency_seconds.observe(gap_s)

    def count_rejected(self, code: str) -> None:
        """A request that ended with an error before it was served (no tokens, no latency to record)."""
        self.requests_finished.labels(model=self.model, reason=ERROR, code=code).inc()

    def set_kv(self, cells_used: int, cells_total: int, sequences_in_use: int, conversations_cached: int) -> None:
        """Set the KV gauges; cells_used counts running requests' cells, not idle prefixes evictable on demand."""
        self.kv_cells_used.set(cells_used)
        self.kv_cells_total.set(cells_total)
        self.kv_usage_ratio.set(cells_used / cells_total if cells_total > 0 else 0.0)
        self.sequences_in_use.set(sequences_in_use)
        self.conversations_cached_kv.set(conversations_cached)

    def set_queue(self, running: int, waiting: int) -> None:
        """Set how many requests this worker decodes and how many it holds waiting for a sequence."""
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def set_backlog(self, lag: int | None, pending: int) -> None:
        """Set the stream backlog (XINFO GROUPS `lag`) and this consumer's pending entries (its PEL).

        Redis reports no lag (nil) when it cannot compute it, and Redis before 7.0 has none: that is NaN here,
        which no alert threshold matches, rather than a stale or made-up number.
        """
        self.stream_backlog.set(math.nan if lag is None else lag)
        self.stream_pending.set(pending)

    def set_conversations_on_disk(self, n: int) -> None:
        """Set how many conversations have a state file (swapped or saved)."""
        self.conversations_on_disk.set(n)

    def count_eviction(self, n: int = 1) -> None:
        """Count idle sequences whose KV was dropped to make room."""
        self.kv_evictions.inc(n)

    def count_preemption(self, n: int = 1) -> None:
        """Count running sequences preempted (their KV freed, recomputed later)."""
        self.preemptions.inc(n)

    def count_swap_out(self, n: int = 1) -> None:
        """Count sequences whose KV was written to disk before eviction."""
        self.swap_out.inc(n)

    def count_swap_in(self, n: int = 1) -> None:
        """Count sequences whose KV was restored from disk."""
        self.swap_in.inc(n)

    def count_restore_check_failure(self) -> None:
        """Count a restored sequence that did not reproduce its recorded logits."""
        self.restore_check_failures.inc()

    def count_restore_refused(self, reason: str) -> None:
        """Count a state file refused before or while loading, by reason (a state_file.RefusalReason value)."""
        self.restore_refused.labels(model=self.model, reason=reason).inc()

    def count_relocations(self, n: int = 1) -> None:
        """Count running sequences moved to other ids to keep the batch in one run of ids."""
        self.relocations.inc(n)

    def count_decode_retry(self) -> None:
        """Count a decode retried after llama.cpp found no KV slot."""
        self.decode_retries.inc()

    def count_dropped(self, reason: str) -> None:
        """Count a request given up without a final event (DROPPED_REDIS_ERROR or DROPPED_LEASE_LOST)."""
        self.requests_dropped.labels(model=self.model, reason=reason).inc()

    def count_redis_retry(self, error: str) -> None:
        """Count a Redis round trip (or some of its commands) retried after an error the server recovers from."""
        self.redis_retries.labels(model=self.model, error=error).inc()

    def count_dead_letter(self) -> None:
        """Count a request entry answered with `internal` because it was delivered too many times."""
        self.dead_letters.inc()

    def count_resume_refused(self) -> None:
        """Count a reclaimed request whose published events could not be resumed from."""
        self.resumes_refused.inc()

    def count_state_dir_error(self, operation: str) -> None:
        """Count an OS error from the state directory (one of STATE_DIR_OPERATIONS)."""
        self.state_dir_errors.labels(model=self.model, operation=operation).inc()

    def count_lease_lapse(self) -> None:
        """Count a heartbeat lease found lapsed (publishing paused until ownership was checked again)."""
        self.lease_lapses.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (prometheus_client.CONTENT_TYPE_LATEST)."""
        return generate_latest(self.registry)

    def sample_names(self) -> frozenset[str]:
        """Every sample name this registry can expose, with the suffixes Prometheus shows (`_total`, `_bucket`...)."""
        return frozenset(
            family.name + suffix
            for family in self.registry.collect()
            for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",))
        )

    # --- definitions --------------------------------------------------------------------------------------

    def _define_info(self, worker: str, kv_layout: str) -> None:
        info = Info(
            "llamaq_worker", "The worker's identity: consumer name and KV layout.", ["model"], registry=self.registry
        )
        info.labels(model=self.model).info({"worker": worker, "kv_layout": kv_layout})

    def _define_gauges(self) -> None:
        self.requests_running = self._gauge(
            "llamaq_requests_running", "Requests this worker is prefilling or decoding."
        )
        self.requests_waiting = self._gauge(
            "llamaq_requests_waiting", "Requests this worker has taken from the stream that wait for a sequence."
        )
        self.stream_backlog = self._gauge(
            "llamaq_stream_backlog",
            "Request stream entries not yet delivered to the consumer group (XINFO GROUPS lag); shared by all "
            "workers of the queue.",
        )
        self.stream_pending = self._gauge(
            "llamaq_stream_pending", "Request stream entries delivered to this worker and not yet acked (its PEL)."
        )
        self.kv_cells_used = self._gauge(
            "llamaq_kv_cells_used", "KV cells holding running requests' tokens (idle cached prefixes not counted)."
        )
        self.kv_cells_total = self._gauge("llamaq_kv_cells_total", "KV cells of the context over all sequences.")
        self.kv_usage_ratio = self._gauge("llamaq_kv_usage_ratio", "llamaq_kv_cells_used / llamaq_kv_cells_total.")
        self.sequences_in_use = self._gauge(
            "llamaq_sequences_in_use", "llama.cpp sequence ids held, by running requests or cached prefixes."
        )
        self.conversations_cached_kv = self._gauge(
            "llamaq_conversations_cached_kv", "Named conversations whose KV is still in the context."
        )
        self.conversations_on_disk = self._gauge(
            "llamaq_conversations_on_disk", "Named conversations with a KV state file on disk."
        )

    def _define_counters(self) -> None:
        finished = Counter(
            "llamaq_requests_finished",
            "Requests ended, by finish reason (stop, length, cancelled, error) and error code.",
            ["model", "reason", "code"],
            registry=self.registry,
        )
        self.requests_finished = finished
        # Known series start at 0 so rate() and ratios of them are defined before the first occurrence.
        for reason in FinishReason:
            finished.labels(model=self.model, reason=reason.value, code="")
        for code in ErrorCode:
            finished.labels(model=self.model, reason=ERROR, code=code.value)
        self.prompt_tokens = self._counter("llamaq_prompt_tokens", "Prompt tokens of finished requests.")
        self.prefix_cache_queries = self._counter(
            "llamaq_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = self._counter(
            "llamaq_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again)."
        )
        self.generation_tokens = self._counter("llamaq_generation_tokens", "Tokens generated for finished requests.")
        self.kv_evictions = self._counter("llamaq_kv_evictions", "Idle sequences evicted from the KV cache.")
        self.preemptions = self._counter(
            "llamaq_preemptions", "Running sequences preempted for lack of KV cells (recomputed later)."
        )
        self.swap_out = self._counter("llamaq_swap_out", "Sequences whose KV was written to disk before eviction.")
        self.swap_in = self._counter("llamaq_swap_in", "Sequences whose KV was restored from disk.")
        self.restore_check_failures = self._counter(
            "llamaq_restore_check_failures", "Restored sequences that did not reproduce their recorded logits."
        )
        self.restore_refused = Counter(
            "llamaq_restore_refused",
            "State files refused before or while loading, by reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.relocations = self._counter(
            "llamaq_sequence_relocations",
            "Running sequences whose KV was moved to another sequence id, so the running ids stay consecutive.",
        )
        self.decode_retries = self._counter(
            "llamaq_decode_retries", "Decodes retried after llama.cpp found no KV slot and idle sequences were evicted."
        )
        self._define_fault_counters()

    def _define_fault_counters(self) -> None:
        self.requests_dropped = Counter(
            "llamaq_requests_dropped",
            "Requests given up without a final event, by reason: redis_error (their own reply stream refused "
            "writes), lease_lost (another worker took them over while this worker's heartbeat lease had lapsed).",
            ["model", "reason"],
            registry=self.registry,
        )
        for reason in (DROPPED_REDIS_ERROR, DROPPED_LEASE_LOST):
            self.requests_dropped.labels(model=self.model, reason=reason)
        self.redis_retries = Counter(
            "llamaq_redis_retries",
            "Redis round trips retried after an error the server recovers from, by error (OOM, MISCONF, "
            "READONLY, LOADING, connection, timeout...).",
            ["model", "error"],
            registry=self.registry,
        )
        self.dead_letters = self._counter(
            "llamaq_dead_letters",
            "Request entries delivered --max-deliveries times without being answered (each delivery's worker "
            "died): answered with `internal` and acked instead of being served again.",
        )
        self.resumes_refused = self._counter(
            "llamaq_resumes_refused",
            "Requests claimed from a dead worker whose reply stream could not be resumed from (token ids outside "
            "the vocabulary, more tokens than the request allows): generated again from the prompt.",
        )
        self.state_dir_errors = Counter(
            "llamaq_state_dir_errors",
            "Operations on the state directory that failed with an OS error, by operation (save, restore, "
            "delete, list); the operation failed alone, a restore fell back to recomputing.",
            ["model", "operation"],
            registry=self.registry,
        )
        for operation in STATE_DIR_OPERATIONS:
            self.state_dir_errors.labels(model=self.model, operation=operation)
        self.lease_lapses = self._counter(
            "llamaq_lease_lapses",
            "Times this worker found its heartbeat lease lapsed (a pause or partition longer than the heartbeat "
            "TTL) and stopped publishing until it had checked which requests are still its own.",
        )

    def _define_histograms(self) -> None:
        seconds, tokens = _SECONDS_BUCKETS, _TOKEN_BUCKETS
        self.queue_time_seconds = self._histogram(
            "llamaq_queue_time_seconds",
            "Time from a request's arrival at the worker to its admission to a sequence.",
            seconds,
        )
        self.time_to_first_token_seconds = self._histogram(
            "llamaq_time_to_first_token_seconds", "Time from a request's arrival to its first sampled token.", seconds
        )
        self.inter_token_latency_seconds = self._histogram(
            "llamaq_inter_token_latency_seconds", "Time between consecutive sampled tokens of a request.", seconds
        )
        self.e2e_request_latency_seconds = self._histogram(
            "llamaq_e2e_request_latency_seconds", "Time from a request's arrival to its final event.", seconds
        )
        self.request_prompt_tokens = self._histogram(
            "llamaq_request_prompt_tokens", "Prompt tokens per finished request.", tokens
        )
        self.request_generation_tokens = self._histogram(
            "llamaq_request_generation_tokens", "Generated tokens per finished request.", tokens
        )
        self.batch_sequences = self._histogram(
            "llamaq_batch_sequences", "Sequences in one decode step.", _BATCH_SEQUENCE_BUCKETS
        )
        self.batch_tokens = self._histogram(
            "llamaq_batch_tokens",
            "Tokens in one decode step (one per decoding sequence plus prefill chunks).",
            _BATCH_TOKEN_BUCKETS,
        )
        self.batch_id_runs = self._histogram(
            "llamaq_batch_id_runs",
            "Runs of consecutive sequence ids in one decode step (llama.cpp micro-batches, per-sequence layout).",
            _BATCH_SEQUENCE_BUCKETS,
        )
        self.decode_step_seconds = self._histogram(
            "llamaq_decode_step_seconds", "Duration of llama_decode for one step.", seconds
        )
        self.step_seconds = self._histogram(
            "llamaq_step_seconds",
            "Duration of one step: llama_decode, sampling and turning tokens into events.",
            seconds,
        )

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, ["model"], registry=self.registry).labels(model=self.model)

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, ["model"], registry=self.registry).labels(model=self.model)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        metric = Histogram(name, documentation, ["model"], registry=self.registry, buckets=buckets)
        return metric.labels(model=self.model)


METRIC_NAMES: frozenset[str] = WorkerMetrics(model="", worker="", kv_layout="", process_metrics=False).sample_names()
"""Every llamaq_ sample name a worker exposes, derived from the registry: what dashboards and alerts may use."""
