"""The benchmark's workload and its arithmetic: the chat prompts every system gets, one trace per request, and
the summary (aggregate tokens/s, time to first token, inter-token latency) computed the same way for all."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "Write a haiku about autumn rain.",
    "How do I boil an egg?",
    "Explain what a neural network is in simple words.",
    "What are the planets of the solar system?",
    "Suggest a name for a small bakery.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hike?",
    "Tell me a fun fact about octopuses.",
    "How can I learn to play the guitar?",
]


def chat_messages(index: int) -> list[dict[str, str]]:
    """The chat of request `index`: one short user question, made unique so no system reuses a whole prompt."""
    # Unique text keeps the comparison about decoding: only the template's own prefix is shared between requests.
    return [{"role": "user", "content": f"{QUESTIONS[index % len(QUESTIONS)]} (#{index})"}]


def request_index(user: int, turn: int, requests_per_user: int) -> int:
    """Global index of a user's turn-th request: every system numbers the same work the same way."""
    return user * requests_per_user + turn


@dataclass
class Trace:
    """One request as its client saw it, in time.monotonic() seconds (one clock for every process on Linux)."""

    index: int
    sent_at: float
    token_times: list[float] = field(default_factory=list)
    """Arrival of every streamed chunk that carried tokens."""
    done_at: float | None = None
    n_tokens: int = 0
    """Generated tokens, as the system reports them (end-of-generation tokens excluded)."""
    error: str | None = None
    worker_ttft_ms: float | None = None
    """llamaq only: TTFT by the worker's own clock, from taking the request off Redis to its first token."""

    @property
    def ok(self) -> bool:
        """True when the request ended with a final answer and no error."""
        return self.error is None and self.done_at is not None

    @property
    def ttft_s(self) -> float | None:
        """Seconds from sending to the first streamed token, queueing included."""
        return self.token_times[0] - self.sent_at if self.token_times else None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(traces: list[Trace]) -> dict[str, float]:
    """Aggregate throughput over the whole run (first send to last answer), TTFT and inter-token latency."""
    ok = [t for t in traces if t.ok]
    if not ok:
        return {"requests": float(len(traces)), "errors": float(len(traces))}
    started = min(t.sent_at for t in traces)
    ended = max(t.done_at for t in ok if t.done_at is not None)
    tokens = sum(t.n_tokens for t in ok)
    ttfts = [t.ttft_s * 1000 for t in ok if t.ttft_s is not None]
    gaps = [(b - a) * 1000 for t in ok for a, b in pairwise(t.token_times)]
    e2e = [(t.done_at - t.sent_at) * 1000 for t in ok if t.done_at is not None]
    worker_ttfts = [t.worker_ttft_ms for t in ok if t.worker_ttft_ms is not None]
    wall_s = max(ended - started, 1e-9)
    summary = {
        "requests": float(len(traces)),
        "errors": float(len(traces) - len(ok)),
        "tokens": float(tokens),
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2),
        "ttft_ms_p50": round(percentile(ttfts, 50), 1),
        "ttft_ms_p95": round(percentile(ttfts, 95), 1),
        "itl_ms_p50": round(percentile(gaps, 50), 2),
        "itl_ms_p95": round(percentile(gaps, 95), 2),
        "e2e_ms_p50": round(percentile(e2e, 50), 1),
        "e2e_ms_max": round(max(e2e), 1),
    }
    if worker_ttfts:
        summary["worker_ttft_ms_p50"] = round(percentile(worker_ttfts, 50), 1)
    return summary


def split_users(n_users: int, n_processes: int) -> list[tuple[int, ...]]:
    """Users dealt round-robin over at most n_processes client processes (none left empty)."""
    n = max(1, min(n_users, n_processes))
    return [tuple(range(p, n_users, n)) for p in range(n)]
