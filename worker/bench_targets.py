"""The targets `make bench` judges, each with its measured value and PASS, MISS or n/a (not measured in this run).

Issue 18's, against llama-server (closed loop, llamaq through Redis, ratios of one run with rounds alternated):
>= 1.15x tokens/s and TTFT p95 no worse at 16 streams; >= 1.0x at 4, 8, 32 and 64; >= 0.97x with lower TTFT at
one stream; and the in-process engine >= 0.95x the bare batched loop (decode and end to end) at every size and
layout, prefix cache on and off. Earlier ones: the Redis path against the in-process engine and against Llama one
at a time, TTFT across chat turns, scheduler overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from .bench_systems import ENGINE, LLAMA_SERIAL, LLAMA_SERVER, REDIS_PATH

TARGET_CLIENTS = 16
"""The client count at which the older throughput targets are judged (the largest measured one up to it)."""
PEER_RATIOS = {1: 0.97, 4: 1.0, 8: 1.0, 16: 1.15, 32: 1.0, 64: 1.0}
"""Least llamaq-through-Redis / llama-server tokens/s per client count."""
ENGINE_VS_BARE = 0.95


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of this report, in order: against llama-server, the engine limit, then the older ones."""
    return _peer_targets(results) + _limit_targets(results) + _older_targets(results)


def _row(results: dict[str, Any], system: str, clients: int | None) -> dict[str, Any]:
    entry = results.get("throughput", {}).get("systems", {}).get(system, {})
    row: dict[str, Any] = entry.get("by_clients", {}).get(str(clients), {})
    return row


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if a and b else None


def _peer_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for clients, least in PEER_RATIOS.items():
        ours, peer = _row(results, REDIS_PATH, clients), _row(results, LLAMA_SERVER, clients)
        ratio = ours.get("vs_llama_server") or _ratio(ours.get("tokens_per_s"), peer.get("tokens_per_s"))
        name = f"at {clients} clients: {REDIS_PATH} >= {least:.2f}x {LLAMA_SERVER} tokens/s"
        rows.append(_target(name, ratio, f">= {least:.2f}", partial(_at_least, least)))
        if clients == 16:
            ttft = _ratio(ours.get("ttft_ms_p95"), peer.get("ttft_ms_p95"))
            name = f"at 16 clients: {REDIS_PATH} TTFT p95 / {LLAMA_SERVER}'s"
            rows.append(_target(name, ttft, "<= 1.00", lambda r: r <= 1.0))
        if clients == 1:
            ttft = _ratio(ours.get("ttft_ms_p50"), peer.get("ttft_ms_p50"))
            name = f"at 1 client: {REDIS_PATH} TTFT p50 / {LLAMA_SERVER}'s (lower)"
            rows.append(_target(name, ttft, "< 1.00", lambda r: r < 1.0))
    return rows


def _limit_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, row in results.get("engine_limit", {}).get("rows", {}).items():
        for system in ("engine, prefix cache on", "engine, prefix cache off"):
            for metric, label in (("decode_tokens_per_s_vs_bare", "decode"), ("e2e_tokens_per_s_vs_bare", "e2e")):
                value = row.get(system, {}).get(metric)
                name = f"engine limit {key} sequences, {system.removeprefix('engine, ')}: {label} vs bare loop"
                rows.append(_target(name, value, f">= {ENGINE_VS_BARE}", lambda r: r >= ENGINE_VS_BARE))
    return rows


def _older_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    measured = results.get("throughput", {}).get("clients", [])
    at = max([c for c in measured if c <= TARGET_CLIENTS] or measured or [TARGET_CLIENTS])
    redis = _row(results, REDIS_PATH, at).get("tokens_per_s")
    for name, peer, rule, passes in (
        (f"{REDIS_PATH} >= 95% of {ENGINE}", ENGINE, ">= 0.95", lambda r: r >= 0.95),
        (f"{REDIS_PATH} >= 1.6x {LLAMA_SERIAL}", LLAMA_SERIAL, ">= 1.6", lambda r: r >= 1.6),
    ):
        value = _ratio(redis, _row(results, peer, at).get("tokens_per_s"))
        rows.append(_target(f"at {at} clients: {name}", value, rule, passes))
    turns = results.get("turns", {}).get("named", [])
    ratio = turns[-1]["ttft_ms"] / turns[0]["ttft_ms"] if len(turns) > 1 else None
    name = f"turn-{len(turns) or 10} TTFT <= 1.2x turn-1 (named conversation)"
    rows.append(_target(name, ratio, "<= 1.2", lambda r: r <= 1.2))
    for n, row in results.get("overhead", {}).get("rows", {"16": {}}).items():
        name = f"scheduler overhead < 5% of the iteration at {n} sequences"
        rows.append(_target(name, row.get("overhead_share"), "< 0.05", lambda r: r < 0.05))
    return rows


def _at_least(least: float, value: float) -> bool:
    return value >= least


def _target(name: str, value: float | None, rule: str, passes: Callable[[float], bool]) -> dict[str, Any]:
    status = "n/a" if value is None else "PASS" if passes(value) else "MISS"
    return {"target": name, "value": None if value is None else round(value, 3), "rule": rule, "status": status}
