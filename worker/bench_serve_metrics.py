"""The open-loop benchmark's arithmetic, defined as `vllm bench serve` defines it, and when a system saturates.

Per completed request: TTFT = first streamed chunk - send; E2E = final event - send; TPOT = (E2E - TTFT) /
(output tokens - 1), for requests of more than one token; ITL = every gap between consecutive streamed chunks.
Over the run (duration = first send to last final event): request throughput = completed / duration, output
throughput = output tokens / duration, total token throughput = (prompt + output tokens) / duration. Each latency
as mean, p50, p90 and p99 (linear interpolation, numpy's default).

Saturation, precisely: a system is saturated at an offered rate when requests leave slower than they arrive,
`keep_up` < 0.9, or when TTFT p99 exceeds a bound. `keep_up` = the span of the middle 80% of send times / the span
of the middle 80% of completion times: the rate requests left at over the rate they arrived at. A system that
keeps up shifts every completion by about one latency, so both spans match (~1.0); one that does not finishes
the same requests over a longer span (capacity / offered). Unlike completed / duration, it is not biased low by the
last requests' own latency, and it uses the arrivals that actually happened, not the nominal rate.
"""

from __future__ import annotations

import statistics
from itertools import pairwise
from typing import Any

from .bench_load import Trace, percentile

KEEP_UP_THRESHOLD = 0.9
PERCENTILES = (50, 90, 99)


def serving_metrics(traces: list[Trace], prompt_tokens: dict[int, int]) -> dict[str, Any]:
    """vLLM's serving metrics of one run; prompt_tokens maps a request's index to its prompt length."""
    ok = [t for t in traces if t.ok and t.done_at is not None]
    out: dict[str, Any] = {"requests": len(traces), "completed": len(ok), "failed": len(traces) - len(ok)}
    errors = sorted({t.error for t in traces if t.error})
    if errors:
        out["errors"] = errors[:3]
    if not ok:
        return out
    started = min(t.sent_at for t in traces)
    duration = max(t.done_at for t in ok if t.done_at is not None) - started
    outputs = sum(t.n_tokens for t in ok)
    inputs = sum(prompt_tokens.get(t.index, 0) for t in ok)
    ttft = [t.ttft_s * 1000 for t in ok if t.ttft_s is not None]
    e2e = [(t.done_at - t.sent_at) * 1000 for t in ok if t.done_at is not None]
    tpot = [
        ((t.done_at - t.sent_at) - t.ttft_s) * 1000 / (t.n_tokens - 1)
        for t in ok
        if t.n_tokens > 1 and t.ttft_s is not None and t.done_at is not None
    ]
    itl = [(b - a) * 1000 for t in ok for a, b in pairwise(t.token_times)]
    out |= {
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 4),
        "output_tokens": outputs,
        "output_throughput": round(outputs / duration, 2),
        "total_token_throughput": round((inputs + outputs) / duration, 2),
        "mean_output_tokens": round(outputs / len(ok), 1),
        "keep_up": keep_up(traces),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        out[f"mean_{name}_ms"] = round(statistics.fmean(values), 2) if values else None
        for q in PERCENTILES:
            out[f"p{q}_{name}_ms"] = round(percentile(values, q), 2) if values else None
    return out


def keep_up(traces: list[Trace]) -> float | None:
    """Span of the middle 80% of sends / span of the middle 80% of completions (failures count as not done)."""
    sends = [t.sent_at for t in traces]
    done = [t.done_at for t in traces if t.ok and t.done_at is not None]
    if len(done) < max(3, len(traces) // 2):
        return 0.0 if traces else None
    sent_span = percentile(sends, 90) - percentile(sends, 10)
    # Requests that never finished stretch the completion span to infinity: counted as completing last.
    done += [max(done)] * (len(traces) - len(done))
    done_span = percentile(done, 90) - percentile(done, 10)
    if done_span <= 0:
        return None
    return round(sent_span / done_span, 3)


def saturation(row: dict[str, Any], ttft_p99_bound_ms: float) -> list[str]:
    """Why a run counts as saturated: 'keep_up' (requests left slower than they came), 'ttft' (p99 over the
    bound), 'failed' (requests failed); empty when it kept up."""
    reasons = []
    value = row.get("keep_up")
    if value is not None and value < KEEP_UP_THRESHOLD:
        reasons.append("keep_up")
    p99 = row.get("p99_ttft_ms")
    if p99 is not None and p99 > ttft_p99_bound_ms:
        reasons.append("ttft")
    if row.get("failed"):
        reasons.append("failed")
    return reasons


def saturation_rate(rows: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    """(highest rate below the first saturated one, first saturated rate) over rows keyed by rate."""
    sustained = None
    for rate in sorted(rows, key=float):
        if rows[rate].get("saturated"):
            return sustained, float(rate)
        sustained = float(rate)
    return sustained, None
