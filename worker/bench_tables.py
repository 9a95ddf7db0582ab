"""Markdown tables of the benchmark's sections, one function per section, each skipped when not measured."""

from __future__ import annotations

import os
from typing import Any

from .bench_systems import ENGINE, REDIS_PATH
from .bench_tables_serving import (
    engine_limit_table,
    round_trips_table,
    serve_table,
    step_budget_table,
    threads_table,
)


def section_tables(results: dict[str, Any]) -> list[str]:
    """Every measured section's table, in report order."""
    lines: list[str] = []
    for section, table in (
        ("throughput", _throughput),
        ("engine_limit", engine_limit_table),
        ("serve", serve_table),
        ("threads", threads_table),
        ("step_budget", step_budget_table),
        ("round_trips", round_trips_table),
        ("turns", _turns),
        ("shared_prefix", _shared_prefix),
        ("overhead", _overhead),
        ("pressure", _pressure),
    ):
        if section in results:
            lines += ["", *table(results[section])]
            if results[section].get("foreign_cpu") is not None and section != "throughput":
                share = _share(results[section]["foreign_cpu"])
                lines += ["", f"Other programs used {share} of the machine's CPU during this section."]
        elif f"{section}_error" in results:
            lines += ["", f"## {section}", "", f"Failed: {results[section + '_error']}"]
    return lines


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else str(value)


def _share(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _throughput(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Throughput",
        "",
        f"{data['description']}",
        "",
        "| clients | system | tokens/s | vs llama-server | vs engine | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | "
        "ITL p95 ms | tokens | errors | foreign CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    systems = data["systems"]
    for clients in data["clients"]:
        base = systems.get(ENGINE, {}).get("by_clients", {}).get(str(clients), {}).get("tokens_per_s")
        for name, entry in systems.items():
            row = entry.get("by_clients", {}).get(str(clients))
            if row is None:
                continue
            ratio = row.get("tokens_per_s", 0) / base if base else None
            peer = row.get("vs_llama_server")
            lines.append(
                f"| {clients} | {name} | {_num(row.get('tokens_per_s'), 1)} | {_num(peer, 2)} | {_num(ratio, 2)} | "
                f"{_num(row.get('ttft_ms_p50'))} | {_num(row.get('ttft_ms_p95'))} | {_num(row.get('itl_ms_p50'), 1)} | "
                f"{_num(row.get('itl_ms_p95'), 1)} | {_num(row.get('tokens'))} | {_num(row.get('errors'))} | "
                f"{_share(row.get('foreign_cpu'))} |"
            )
    lines += _redis_cpu(systems.get(REDIS_PATH, {}).get("by_clients", {}))
    for name, entry in systems.items():
        if not entry.get("available", True):
            lines.append(f"\n{name}: not available ({entry.get('reason')})")
        for clients, row in entry.get("by_clients", {}).items():
            if "error" in row:
                lines.append(f"\n{name} at {clients} clients failed in a round: {row['error']}")
    return lines


def _redis_cpu(by_clients: dict[str, dict[str, Any]]) -> list[str]:
    """Where the CPU went in the Redis path: the engine's threads against everything the transport costs."""
    rows = {c: r for c, r in by_clients.items() if "cpu_s_worker_engine" in r and r.get("wall_s")}
    if not rows:
        return []
    lines = [
        "",
        f"CPU seconds during the {REDIS_PATH} runs (the machine has {os.cpu_count()} cores): the engine's threads "
        "(engine loop and llama.cpp's), and what the transport costs besides: the worker's event loop (intake, "
        "publisher, metrics), Valkey, and the client processes.",
        "",
        "| clients | wall s | engine threads | worker event loop | Valkey | clients | transport share of all cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, r in rows.items():
        transport = r["cpu_s_worker_event_loop"] + r["cpu_s_valkey"] + r["cpu_s_clients"]
        share = transport / (r["wall_s"] * (os.cpu_count() or 1))
        lines.append(
            f"| {clients} | {r['wall_s']:.1f} | {r['cpu_s_worker_engine']:.1f} | {r['cpu_s_worker_event_loop']:.2f} | "
            f"{r['cpu_s_valkey']:.2f} | {r['cpu_s_clients']:.2f} | {share * 100:.1f}% |"
        )
    return lines


def _turns(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Time to first token per turn",
        "",
        f"A {data['turns']}-turn chat, {data['max_tokens']} tokens per reply, median of {data['repeats']} chats. "
        "Named: the worker keeps the history and its KV; stateless: the whole history is sent every turn to a "
        "worker that caches nothing. TTFT as the client sees it (worker's own figure in brackets).",
        "",
        "| turn | history tokens | named TTFT ms | cached | stateless TTFT ms | stateless / named |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(data["named"], data["stateless"], strict=True):
        lines.append(
            f"| {a['turn']:.0f} | {a['prompt_tokens']:.0f} | {a['ttft_ms']:.0f} ({a['worker_ttft_ms']:.0f}) | "
            f"{a['cached_tokens']:.0f} | {b['ttft_ms']:.0f} ({b['worker_ttft_ms']:.0f}) | "
            f"{b['ttft_ms'] / a['ttft_ms']:.1f} |"
        )
    return lines


def _shared_prefix(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    first = next(iter(rows.values()))
    lines = [
        "## Shared system prompt",
        "",
        f"{data['chats']} chats sharing a system prompt, {first['prompt_tokens_each']:.0f} prompt tokens each, "
        f"{data['max_tokens']} generated, all sent at once.",
        "",
        "| setting | prefill tokens | cached tokens | KV cells peak | KV cells after | TTFT p50 ms | TTFT max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_num(r['prefill_tokens'])} | {_num(r['cached_tokens'])} | {_num(r['kv_cells_peak'])} | "
            f"{_num(r['kv_cells_held_after'])} | {_num(r['ttft_ms_p50'])} | {_num(r['ttft_ms_max'])} |"
        )
    return lines


def _overhead(data: dict[str, Any]) -> list[str]:
    rows = {n: r for n, r in data["rows"].items() if "error" not in r}
    lines = [
        "## Scheduler overhead",
        "",
        "In-process engine, n sequences decoding story continuations, iterations that decoded one token of every "
        "sequence. An iteration runs from one emit callback to the next (commands, scheduling, batch, llama_decode, "
        "sampling, events); overhead = the share outside llama_decode. Per iteration, ms:",
        "",
        "| sequences | iterations | whole iteration | inside llama_decode | filling the batch | sampling and events "
        "| rest of the loop (commands, schedule, emit) | overhead share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in rows.items():
        lines.append(
            f"| {n} | {r['iterations']} | {r['iteration_ms']:.2f} | {r['llama_decode_ms']:.2f} | "
            f"{r['batch_fill_ms']:.2f} | {r['sampling_and_events_ms']:.2f} | {r['loop_rest_ms']:.2f} | "
            f"**{r['overhead_share'] * 100:.1f}%** |"
        )
    for n, r in data["rows"].items():
        if "error" in r:
            lines.append(f"\n{n} sequences: not measured ({r['error']})")
    return lines


def _pressure(data: dict[str, Any]) -> list[str]:
    return [
        "## Pressure",
        "",
        f"{data['requests']} requests from {data['client_processes']} client processes at once, "
        f"{data['max_tokens']} tokens each, worker with {data['parallel']} sequences ({data['n_ctx']} cells).",
        "",
        "| completed | failed | time to last answer s | tokens/s | TTFT p50 ms | TTFT p95 ms | latency p50 s | "
        "worker RSS idle MiB | worker RSS peak MiB | VmHWM MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {data['completed']} | {data['failed']} | {_num(data['completion_s'], 1)} | {_num(data['tokens_per_s'], 1)} "
        f"| {_num(data['ttft_ms_p50'])} | {_num(data['ttft_ms_p95'])} | {_num(data['e2e_s_p50'], 1)} | "
        f"{_num(data['worker_rss_mib_idle'])} | {_num(data['worker_rss_mib_peak'])} | "
        f"{_num(data['worker_vm_hwm_mib'])} |",
    ]
