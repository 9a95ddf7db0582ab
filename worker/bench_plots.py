"""The benchmark's PNG plots: throughput and TTFT against clients, TTFT per turn, and the open-loop sweep's TTFT
p99 and achieved request rate against the offered rate. None without matplotlib (the `bench` extra)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any


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
    return written + _plot_serve(plt, results.get("serve", {}), out)


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


def _plot_serve(plt: Any, serve: dict[str, Any], out: Path) -> list[Path]:
    """TTFT p99 against offered rate (log scale, saturation marked), and achieved against offered rate."""
    systems = {name: entry for name, entry in serve.get("systems", {}).items() if entry.get("by_rate")}
    if not systems:
        return []
    figure, (ttft_axes, rate_axes) = plt.subplots(1, 2, figsize=(11, 4))
    top = 0.0
    for index, (name, entry) in enumerate(systems.items()):
        rates = sorted(entry["by_rate"], key=float)
        rows = [entry["by_rate"][r] for r in rates]
        x = [float(r) for r in rates]
        color = f"C{index}"
        ttft_axes.plot(x, [r.get("p99_ttft_ms") or math.nan for r in rows], "-", marker="o", color=color, label=name)
        rate_axes.plot(
            x, [r.get("request_throughput") or math.nan for r in rows], "-", marker="o", color=color, label=name
        )
        if entry.get("saturated_at") is not None:
            ttft_axes.axvline(entry["saturated_at"], color=color, linestyle=":", linewidth=1)
        top = max(top, *x)
    bound = serve.get("ttft_p99_bound_ms")
    if bound:
        ttft_axes.axhline(bound, color="grey", linestyle="--", linewidth=1, label="saturation bound")
    ttft_axes.set(
        xlabel="offered requests/s",
        ylabel="TTFT p99 ms",
        yscale="log",
        title="TTFT p99 against offered rate (dotted: saturated)",
    )
    rate_axes.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="offered")
    rate_axes.set(xlabel="offered requests/s", ylabel="completed requests/s", title="Request throughput")
    rate_axes.set_ylim(bottom=0)
    for axes in (ttft_axes, rate_axes):
        axes.legend()
    figure.tight_layout()
    path = out / "serve_ttft_p99.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]
