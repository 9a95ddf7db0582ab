"""The benchmark's outputs: what the run was (date, machine, commit, model), the targets with PASS or MISS, and
bench.json, bench.md and PNG plots in the output folder."""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bench_systems import ENGINE, LLAMA_SERIAL, LLAMA_SERVER, REDIS_PATH

TARGET_CLIENTS = 16
"""The client count at which the throughput targets are judged (the largest measured one up to it otherwise)."""


def run_metadata(model: Path, threads: int) -> dict[str, Any]:
    """Date, machine, commit and software of this run."""
    import llama_cpp

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": _commit(),
        "model": model.name,
        "llama_cpp_python": llama_cpp.__version__,
        "threads": threads,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and PASS, MISS or n/a (not measured in this run)."""
    rows = []
    throughput = results.get("throughput", {})
    measured = [c for c in throughput.get("clients", []) if c <= TARGET_CLIENTS] or throughput.get("clients", [])
    at = max(measured) if measured else None

    def tok_s(system: str) -> float | None:
        entry = throughput.get("systems", {}).get(system, {})
        value = entry.get("by_clients", {}).get(str(at), {}).get("tokens_per_s")
        return float(value) if value else None

    redis = tok_s(REDIS_PATH)
    for name, peer, rule, passes in (
        (f"{REDIS_PATH} >= 95% of {ENGINE}", ENGINE, ">= 0.95", lambda r: r >= 0.95),
        (f"{REDIS_PATH} >= 1.6x {LLAMA_SERIAL}", LLAMA_SERIAL, ">= 1.6", lambda r: r >= 1.6),
        (f"{REDIS_PATH} > {LLAMA_SERVER}", LLAMA_SERVER, "> 1.0", lambda r: r > 1.0),
    ):
        other = tok_s(peer)
        rows.append(_target(f"at {at} clients: {name}", redis / other if redis and other else None, rule, passes))
    turns = results.get("turns", {}).get("named", [])
    ratio = turns[-1]["ttft_ms"] / turns[0]["ttft_ms"] if len(turns) > 1 else None
    name = f"turn-{len(turns) or 10} TTFT <= 1.2x turn-1 (named conversation)"
    rows.append(_target(name, ratio, "<= 1.2", lambda r: r <= 1.2))
    overhead = results.get("overhead", {}).get("overhead_share")
    rows.append(_target("scheduler overhead < 5% of the iteration", overhead, "< 0.05", lambda r: r < 0.05))
    return rows


def _target(name: str, value: float | None, rule: str, passes: Callable[[float], bool]) -> dict[str, Any]:
    status = "n/a" if value is None else "PASS" if passes(value) else "MISS"
    return {"target": name, "value": None if value is None else round(value, 3), "rule": rule, "status": status}


def write_outputs(results: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """bench.json, bench.md and (unless told not to) the plots; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    drawn = write_plots(results, out) if plots else []
    written[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    written[1].write_text(markdown(results, [p.name for p in drawn]))
    return written + drawn


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    """The whole report as Markdown, starting with what the run was."""
    from .bench_tables import section_tables

    meta = results["meta"]
    lines = [
        "# llamaq benchmark",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores",
        f"- Commit: {meta['commit']}",
        f"- Model: {meta['model']} (llama-cpp-python {meta['llama_cpp_python']}), {meta['threads']} threads for "
        "every system, flash attention on, Q8_0 K and V, greedy",
        f"- llama-server: {meta.get('llama_server', 'not measured')}",
        f"- Settings: {meta.get('settings', '')}",
        "",
        "## Targets",
        "",
        "| target | measured | rule | result |",
        "|---|---|---|---|",
    ]
    for row in results.get("targets", []):
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        lines.append(f"| {row['target']} | {value} | {row['rule']} | {row['status']} |")
    lines += section_tables(results)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    elif results.get("plots_skipped"):
        lines += ["", f"Plots skipped: {results['plots_skipped']}"]
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Throughput and TTFT against clients per system, and TTFT per turn, as PNG; none without matplotlib."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        results["plots_skipped"] = "matplotlib is not installed (pip install 'llamaq[bench]')"
        return []
    written = []
    systems = {
        name: entry["by_clients"]
        for name, entry in results.get("throughput", {}).get("systems", {}).items()
        if entry.get("by_clients")
    }
    if systems:
        written.append(_plot_by_clients(plt, systems, [("tokens_per_s", "-")], "tokens/s", out / "throughput.png"))
        written.append(
            _plot_by_clients(
                plt,
                systems,
                [("ttft_ms_p50", "-"), ("ttft_ms_p95", "--")],
                "TTFT ms (p50 solid, p95 dashed)",
                out / "ttft.png",
                yscale="log",
            )
        )
    turns = results.get("turns", {})
    if turns.get("named"):
        figure, axes = plt.subplots(figsize=(7, 4))
        for key, label in (("named", "named conversation"), ("stateless", "stateless full history")):
            rows = turns.get(key, [])
            axes.plot([r["turn"] for r in rows], [r["ttft_ms"] for r in rows], marker="o", label=label)
        axes.set(xlabel="turn", ylabel="TTFT ms", title="Time to first token per turn")
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / "turns_ttft.png", dpi=110)
        plt.close(figure)
        written.append(out / "turns_ttft.png")
    return written


def _plot_by_clients(
    plt: Any,
    systems: dict[str, dict[str, dict[str, float]]],
    series: list[tuple[str, str]],
    label: str,
    path: Path,
    yscale: str = "linear",
) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4))
    for index, (name, by_clients) in enumerate(systems.items()):
        clients = sorted(int(c) for c in by_clients)
        for key, style in series:
            values = [by_clients[str(c)].get(key, math.nan) for c in clients]
            axes.plot(clients, values, style, marker="o", color=f"C{index}", label=name if style == "-" else None)
    axes.set(xlabel="concurrent clients", ylabel=label, xscale="log", yscale=yscale, title=label)
    if yscale == "linear":
        axes.set_ylim(bottom=0)
    ticker = importlib.import_module("matplotlib.ticker")
    axes.set_xticks(sorted({int(c) for b in systems.values() for c in b}))
    axes.xaxis.set_major_formatter(ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
