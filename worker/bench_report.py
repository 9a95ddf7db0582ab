"""The benchmark's outputs: what the run was (date, machine, commit, model, llama-server build), the targets
with PASS or MISS, and bench.json, bench.md and PNG plots in the output folder."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .bench_plots import write_plots


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
        f"- llama-server version: {meta.get('llama_server_version', 'not measured')}",
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
