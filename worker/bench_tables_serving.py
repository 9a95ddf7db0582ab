"""Markdown tables of the engine-limit, open-loop (serve) and lever sections (threads, step budget, round trips)."""

from __future__ import annotations

from typing import Any

from .bench_serve_metrics import KEEP_UP_THRESHOLD

LATENCY_COLUMNS: list[tuple[str, str, int]] = [
    ("TTFT p50 ms", "p50_ttft_ms", 0),
    ("TTFT p99 ms", "p99_ttft_ms", 0),
    ("TPOT p50 ms", "p50_tpot_ms", 1),
    ("TPOT p99 ms", "p99_tpot_ms", 1),
    ("ITL p50 ms", "p50_itl_ms", 1),
    ("ITL p99 ms", "p99_itl_ms", 1),
]


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else str(value)


Column = tuple[str, str, int]
"""A metric column: its header, the row's key, the digits shown."""


def _table(labels: list[str], columns: list[Column], rows: list[tuple[list[str], dict[str, Any]]]) -> list[str]:
    """A Markdown table: label columns, then one column per metric of each row's dict."""
    headers = labels + [header for header, _key, _digits in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for cells, row in rows:
        values = [_num(row.get(key), digits) for _header, key, digits in columns]
        lines.append("| " + " | ".join([*cells, *values]) + " |")
    return lines


def engine_limit_table(data: dict[str, Any]) -> list[str]:
    """Bare loop against the engine, per layout and size."""
    lines = [
        "## Engine limit",
        "",
        f"A bare batched loop over llama-cpp-python (ids 0..n-1 ascending in every batch, one greedy sampler) "
        f"against llamaq's engine in-process, same context (n_seq_max = n, {data['cells_per_sequence']} cells "
        f"each, n_batch {data['n_batch']}), same story prompts, up to {data['max_tokens']} tokens each; median of "
        f"{data['rounds']} round(s), systems alternated. Ids scattered for the engine: {data['scatter']}. "
        "Decode = tokens/s over steps that decoded every sequence; e2e = generated tokens / (first prompt to last "
        "token). The id order is what reached llama_decode in the full decode steps; id runs = runs of consecutive "
        "ids, one llama.cpp micro-batch each in the per-sequence layout.",
        "",
    ]
    rows = []
    for row in data["rows"].values():
        for system in ("bare loop", "engine, prefix cache on", "engine, prefix cache off"):
            r = dict(row.get(system, {}))
            order = r.get("batch_order", {})
            ids = (order.get("decode_orders") or [{}])[0].get("ids", [])
            r["ascending"] = f"{order.get('decode_steps_ascending', '-')}/{order.get('decode_steps', '-')}"
            r["runs"] = order.get("decode_id_runs_mean")
            r["ids"] = ",".join(str(i) for i in ids[:16]) + (",..." if len(ids) > 16 else "")
            rows.append(([row["layout"], str(row["sequences"]), system], r))
    columns = [
        ("decode tok/s", "decode_tokens_per_s", 1),
        ("step ms", "decode_step_ms", 1),
        ("e2e tok/s", "e2e_tokens_per_s", 1),
        ("generated", "generated", 0),
        ("decode vs bare", "decode_tokens_per_s_vs_bare", 3),
        ("e2e vs bare", "e2e_tokens_per_s_vs_bare", 3),
        ("ascending decode steps", "ascending", 0),
        ("id runs per decode step", "runs", 2),
        ("ids of the commonest decode order", "ids", 0),
    ]
    return lines + _table(["layout", "sequences", "system"], columns, rows)


def serve_table(data: dict[str, Any]) -> list[str]:
    """The rate sweep: vLLM's metrics per system and rate, and where each saturated."""
    lines = [
        "## Open loop (rate sweep)",
        "",
        f"{data['request_set']['count']} synthetic chat requests shipped in bench/data (mean max_tokens "
        f"{data['request_set']['mean_max_tokens']}), Poisson arrivals (seeded), {data['window_s']:g} s of arrivals "
        f"per rate (at least {data['min_requests']} requests), {data['parallel']} sequences/slots of "
        f"{data['cells_per_sequence']} cells, each system started afresh per rate, the two alternated. Output "
        f"length: {data['output_length_rule']}. Clients: {data['clients']}. TTFT, TPOT = (E2E - TTFT) / (output "
        "tokens - 1), ITL = every gap between streamed chunks, as `vllm bench serve`. Saturated: keep-up (span of "
        "the middle 80% of sends / of completions) < "
        f"{KEEP_UP_THRESHOLD}, or TTFT p99 > {data['ttft_p99_bound_ms']:g} ms, or a failed request.",
        "",
    ]
    rows = []
    for name, entry in data["systems"].items():
        for rate in sorted(entry["by_rate"], key=float):
            r = dict(entry["by_rate"][rate])
            r["done"] = f"{r.get('completed', 0)}/{r.get('requests', 0)}"
            r["why"] = ", ".join(r.get("saturation", [])) or "no"
            rows.append(([name, rate], r))
    columns = [
        ("requests", "done", 0),
        ("req/s", "request_throughput", 2),
        ("output tok/s", "output_throughput", 1),
        *LATENCY_COLUMNS,
        ("mean output tokens", "mean_output_tokens", 1),
        ("keep-up", "keep_up", 2),
        ("saturated", "why", 0),
    ]
    lines += _table(["system", "offered req/s"], columns, rows)
    lines.append("")
    for name, entry in data["systems"].items():
        at = entry.get("saturated_at")
        lines.append(
            f"- {name}: kept up to {_num(entry.get('sustained_rate'), 2)} requests/s; "
            + (f"saturated at {at:g} requests/s." if at is not None else "did not saturate at the rates swept.")
        )
    return lines


def threads_table(data: dict[str, Any]) -> list[str]:
    """Closed loop with 1 or 2 llama.cpp threads."""
    lines = [
        "## llama.cpp threads",
        "",
        "Closed loop as the throughput section, with each llama.cpp thread count for both systems, alternated.",
        "",
    ]
    rows = [([r["system"], str(r["clients"]), str(r["threads"])], r) for r in data["rows"].values()]
    columns = [
        ("tokens/s", "tokens_per_s", 1),
        ("TTFT p50 ms", "ttft_ms_p50", 0),
        ("TTFT p95 ms", "ttft_ms_p95", 0),
        ("ITL p50 ms", "itl_ms_p50", 1),
        ("ITL p95 ms", "itl_ms_p95", 1),
    ]
    return lines + _table(["system", "clients", "threads"], columns, rows)


def step_budget_table(data: dict[str, Any]) -> list[str]:
    """Open loop at one rate with each step token budget."""
    lines = [
        "## Step token budget",
        "",
        f"llamaq through Redis, {data['requests']} requests of the shipped set at {data['rate']:g} requests/s "
        f"(same arrivals for every budget), {data['parallel']} sequences. The budget is the most tokens one step "
        "decodes: one per decoding sequence, the rest prefill chunks.",
        "",
    ]
    rows = [([budget], r) for budget, r in data["rows"].items()]
    columns = [("req/s", "request_throughput", 2), ("output tok/s", "output_throughput", 1), *LATENCY_COLUMNS]
    return lines + _table(["budget"], columns, rows)


def round_trips_table(data: dict[str, Any]) -> list[str]:
    """Round trips and Valkey commands per engine step."""
    lines = [
        "## Redis round trips per step",
        "",
        f"Closed loop, {data['max_tokens']} tokens per request. Worker round trips are counted inside the worker "
        "process (every redis-py send, a pipeline counted once, by its first command); Valkey commands per step "
        "come from INFO commandstats and include the clients' commands. Steps from the worker's "
        "llamaq_step_seconds_count.",
        "",
    ]
    rows = []
    for clients, r in data["rows"].items():
        shown = dict(r)
        shown["trips"] = ", ".join(f"{k} {v}" for k, v in r["worker_round_trips_by_first_command"].items())
        shown["commands"] = ", ".join(f"{k} {v}" for k, v in r["valkey_commands_per_step"].items())
        rows.append(([clients], shown))
    columns = [
        ("steps", "steps", 0),
        ("tokens", "tokens", 0),
        ("worker round trips / step", "worker_round_trips_per_step", 2),
        ("worker round trips by first command", "trips", 0),
        ("Valkey commands / step", "commands", 0),
    ]
    return lines + _table(["clients"], columns, rows)
