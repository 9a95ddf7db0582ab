"""Every Prometheus metric of a gateway, on its own registry, served at the gateway's GET /metrics.

Names are prefixed `llamaq_gateway_` so they sit beside the workers' `llamaq_` series without clashing. The tenant
label comes from API keys only (a bounded set named by the operator), never from a caller's `user` field, which
would let callers create series at will; without keys it is `anonymous`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from llamaq.protocol import Usage

ANONYMOUS = "anonymous"
CLIENT_CLOSED = 499
"""The status recorded for a caller that went away before its answer (nginx's convention): never sent."""

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
"""From a cached prompt on a GPU to a long prefill on a CPU behind a queue."""


class GatewayMetrics:
    """The metrics of one gateway process."""

    def __init__(self, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "llamaq_gateway_requests",
            "HTTP requests answered, by endpoint, status (499: the caller went away) and tenant",
            ["endpoint", "status", "tenant"],
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "llamaq_gateway_time_to_first_byte_seconds",
            "From a generation request's arrival to the first byte of its answer (a stream's first event)",
            ["endpoint", "stream"],
            registry=self.registry,
            buckets=_SECONDS_BUCKETS,
        )
        self.open_streams = Gauge(
            "llamaq_gateway_open_streams", "Server-sent event streams being written now", registry=self.registry
        )
        self.tokens = Counter(
            "llamaq_gateway_tokens",
            "Tokens of finished generations by tenant: prompt, cached (part of prompt) and completion",
            ["tenant", "kind"],
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, status: int, tenant: str) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint=endpoint, status=str(status), tenant=tenant).inc()

    def observe_first_byte(self, endpoint: str, stream: bool, seconds: float) -> None:
        """Record the time a generation request waited for the first byte of its answer."""
        self.time_to_first_byte.labels(endpoint=endpoint, stream=str(stream).lower()).observe(seconds)

    def observe_usage(self, tenant: str, usage: Usage) -> None:
        """Add one finished generation's tokens to its tenant."""
        self.tokens.labels(tenant=tenant, kind="prompt").inc(usage.prompt_tokens)
        self.tokens.labels(tenant=tenant, kind="cached").inc(usage.cached_tokens)
        self.tokens.labels(tenant=tenant, kind="completion").inc(usage.completion_tokens)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)
