"""The throughput section: every chosen system at every client count, interleaved so that anything else the
machine does in the meantime falls on all systems alike."""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .bench_cpu import measured_quietly
from .bench_http import find_llama_server, per_slot_kv_flag
from .bench_load import summarize
from .bench_systems import (
    CELLS_PER_SEQUENCE,
    ENGINE,
    LLAMA_SERIAL,
    LLAMA_SERVER,
    N_BATCH,
    REDIS_PATH,
    SYSTEMS,
    Load,
    Measured,
    new_llama,
    prompt_tokens,
    run_engine,
    run_llama_serial,
    run_llama_server,
    run_redis,
)

log = logging.getLogger("llamaq.bench")

if TYPE_CHECKING:
    from .bench_plan import Plan

T = TypeVar("T")


def measure_throughput(
    args: argparse.Namespace,
    plan: Plan,
    model: Path,
    url: str | None,
    work: Path,
    step: Callable[[str], None],
    chosen: list[str],
    results: dict[str, Any],
) -> dict[str, Any]:
    """Tokens/s, TTFT and inter-token latency of each chosen system at each client count."""
    unknown = set(chosen) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {sorted(SYSTEMS)}")
    systems: dict[str, dict[str, Any]] = {SYSTEMS[s]: {"available": True, "by_clients": {}} for s in chosen}
    data = {
        "clients": list(plan.clients),
        "requests_per_client": plan.requests_per_client,
        "rounds": plan.rounds,
        "max_tokens": plan.max_tokens,
        "description": _description(plan, args.client_processes),
        "systems": systems,
    }
    # Filled in place, so a run cut short leaves the rows it finished in the results it writes.
    results["throughput"] = data
    server_binary = None
    if not args.skip_llama_server:
        server_binary, source = find_llama_server(args.llama_server)
        results["meta"]["llama_server"] = (
            f"{source}, run as `llama-server -np CLIENTS -c CLIENTS*{CELLS_PER_SEQUENCE} -fa on -ctk q8_0 -ctv q8_0 "
            f"-t {args.threads} -tb {args.threads} -b {N_BATCH} -ub {N_BATCH}"
            f"{' --no-kv-unified' if per_slot_kv_flag(server_binary) else ''}`"
            if server_binary
            else f"not available ({source})"
        )
        if LLAMA_SERVER in systems and server_binary is None:
            systems[LLAMA_SERVER].update(available=False, reason=source)
    else:
        results["meta"]["llama_server"] = "not available (skipped: --skip-llama-server)"
    step("throughput: rendering prompts")
    prompts = prompt_tokens(model, max(plan.clients) * plan.requests_per_client)
    load = Load(0, plan.requests_per_client, plan.max_tokens, args.threads, model, args.client_processes)
    llama = new_llama(load) if LLAMA_SERIAL in systems else None

    runners: dict[str, Callable[[Load], Measured]] = {
        REDIS_PATH: lambda load: run_redis(_need(url), load, work),
        ENGINE: run_engine,
        LLAMA_SERIAL: lambda load: run_llama_serial(llama, prompts, load),
        LLAMA_SERVER: lambda load: run_llama_server(_need(server_binary), prompts, load, work),
    }
    for clients in plan.clients:
        load = Load(clients, plan.requests_per_client, plan.max_tokens, args.threads, model, args.client_processes)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
        for round_index in range(plan.rounds):
            # Every other round runs the systems in reverse, so a drift of the machine falls on all alike.
            order = list(systems) if round_index % 2 == 0 else list(reversed(systems))
            for name in order:
                step(f"throughput: {name}, {clients} clients, round {round_index + 1}")
                if not systems[name]["available"]:
                    continue
                try:
                    measure = partial(_summarized, runners[name], load)
                    summary, share, attempts = measured_quietly(
                        measure, args.max_foreign_cpu, args.attempts, args.quiet_wait
                    )
                    rounds[name].append({**summary, "foreign_cpu": share, "attempts": attempts})
                except Exception as exc:
                    log.exception("%s at %d clients failed", name, clients)
                    rounds[name].append({"error": f"{type(exc).__name__}: {exc}"})
        for name, entry in systems.items():
            if rounds[name]:
                entry["by_clients"][str(clients)] = combine_rounds(rounds[name])
        _ratios_by_round(systems, rounds, clients)
    if llama is not None:
        llama.close()
    results["meta"]["settings"] = (
        f"{CELLS_PER_SEQUENCE} KV cells per sequence/slot (n_ctx = clients x {CELLS_PER_SEQUENCE}), "
        f"step budget {N_BATCH}, {args.threads} threads"
    )
    return data


def combine_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a client count: the median of each figure over the rounds (an error if any round failed)."""
    failed = [r for r in rows if "error" in r]
    if failed:
        return {"error": failed[0]["error"], "rounds": rows}
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float) and v is not None]
    combined: dict[str, Any] = {
        k: round(statistics.median(float(r[k]) for r in rows if r.get(k) is not None), 3) for k in keys
    }
    combined["rounds"] = rows
    return combined


def _ratios_by_round(systems: dict[str, dict[str, Any]], rounds: dict[str, list[dict[str, Any]]], clients: int) -> None:
    """llamaq's tokens/s over llama-server's, round by round (each pair measured side by side), and their median."""
    if REDIS_PATH not in rounds or LLAMA_SERVER not in rounds:
        return
    pairs = [
        a["tokens_per_s"] / b["tokens_per_s"]
        for a, b in zip(rounds[REDIS_PATH], rounds[LLAMA_SERVER], strict=False)
        if a.get("tokens_per_s") and b.get("tokens_per_s")
    ]
    row = systems[REDIS_PATH]["by_clients"].get(str(clients))
    # A client count with a failed round has no ratio: its target then reads n/a, not a partial verdict.
    if pairs and row is not None and "error" not in row:
        row["vs_llama_server_by_round"] = [round(p, 3) for p in pairs]
        row["vs_llama_server"] = round(statistics.median(pairs), 3)


def _summarized(run: Callable[[Load], Measured], load: Load) -> dict[str, float]:
    traces, extra = run(load)
    return {**summarize(traces), **extra}


def _need(value: T | None) -> T:
    if value is None:
        raise RuntimeError("not available")
    return value


def _description(plan: Plan, client_processes: int) -> str:
    where = (
        "one client process (one asyncio event loop: a llamaq Client for Redis, one connection per request for "
        "HTTP), the same for both"
        if client_processes == 1
        else f"up to {client_processes} client processes, dealt alike for both"
    )
    return (
        f"Each client sends {plan.requests_per_client} chat request(s) one after the other (closed loop), greedy, "
        f"up to {plan.max_tokens} tokens each; prompts are short questions (numbered, so no whole prompt repeats) "
        "rendered with the model's chat template. Llama (`create_completion`) and llama-server (`/completion`) get "
        f"the very tokens our template renders. Redis and HTTP clients run in {where}; the in-process engine has "
        "none; Llama serves requests in arrival order and its TTFT includes the wait. tokens/s = all generated "
        "tokens / (first send to last answer). ITL = every gap between streamed chunks. Each figure is the median "
        f"of {plan.rounds} round(s); the systems run in turn, reversed every other round. 'vs llama-server' = "
        "median over rounds of llamaq-through-Redis tokens/s / llama-server's in the same round; 'vs engine' = "
        "tokens/s / the in-process engine's."
    )
