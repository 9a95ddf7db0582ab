"""The `llamaq` command: worker, generate, chat and demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llamaq.protocol import Limits

from .engine import KvType


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llamaq` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Any = args.handler
    code: int = handler(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaq", description="Share one local LLM among many chat backends.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    worker = commands.add_parser("worker", help="run a worker in the foreground until SIGINT/SIGTERM")
    worker.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="Redis/Valkey URL (default: $REDIS_URL, else start an embedded Valkey)",
    )
    worker.add_argument("--model", type=Path, help="GGUF model file (default: SmolLM2-135M-Instruct)")
    _add_engine_flags(worker)
    worker.add_argument("--prefix", default="llamaq", help="key prefix")
    worker.add_argument("--queue", default="default", help="queue name (one request stream per queue)")
    worker.add_argument(
        "--conversation-ttl",
        type=int,
        default=7 * 24 * 3600,
        help="seconds a named conversation's history lives in Redis after its last turn",
    )
    worker.add_argument(
        "--state-dir",
        type=Path,
        default=os.environ.get("LLAMAQ_STATE_DIR"),
        help="directory for swapped-out and saved KV states (default: $LLAMAQ_STATE_DIR, else none)",
    )
    worker.add_argument(
        "--state-dir-max-mb",
        type=int,
        default=4096,
        help="size cap of the state directory in MiB; swap files are deleted least recently used first",
    )
    worker.add_argument(
        "--swap-min-tokens", type=int, default=64, help="shortest conversation worth swapping out to disk"
    )
    worker.add_argument(
        "--max-backlog",
        type=int,
        default=10_000,
        help="requests the stream may hold before clients get `overloaded` at once (0: unbounded)",
    )
    worker.add_argument(
        "--max-tenant-in-flight",
        type=int,
        default=128,
        help="requests one tenant (else client) may have sent and not yet had answered (0: unbounded)",
    )
    worker.add_argument(
        "--max-tenant-backlog",
        type=int,
        default=64,
        help="requests of one tenant (else client) that may wait in the stream unread by a worker (0: unbounded)",
    )
    limits = Limits()
    worker.add_argument("--max-entry-bytes", type=int, default=limits.max_entry_bytes, help="largest request entry")
    worker.add_argument("--max-messages", type=int, default=limits.max_messages, help="most messages in a chat")
    worker.add_argument(
        "--max-request-tokens", type=int, default=limits.max_tokens, help="largest max_tokens a request may ask"
    )
    worker.add_argument(
        "--max-text-chars", type=int, default=limits.max_text_chars, help="longest prompt or message text"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("LLAMAQ_METRICS_PORT", "9464"),
        help="port of /metrics, /healthz and /readyz (0: any free port)",
    )
    worker.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics server binds")
    worker.add_argument("--no-metrics", action="store_true", help="serve no metrics or health endpoints")
    worker.add_argument(
        "--heartbeat-ttl",
        type=int,
        default=10,
        help="seconds a worker's heartbeat lives: one silent this long is taken over by the others (and, if it "
        "was only paused, stops publishing until it knows what is still its own); the same on every worker",
    )
    worker.add_argument(
        "--max-deliveries",
        type=int,
        default=3,
        help="deliveries of a request after which it is answered `internal` instead of served again (each "
        "worker that took it died); 0: no limit",
    )
    worker.add_argument(
        "--restore-tolerance",
        type=float,
        default=0.0,
        help="largest logit difference a verified restore may show (default 0: bit-identical, as on the CPU)",
    )
    worker.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to finish in-flight requests on shutdown before cancelling them",
    )
    worker.set_defaults(handler=_run_worker)

    generate = commands.add_parser("generate", help="stream one generation from a running worker")
    generate.add_argument("prompt")
    generate.add_argument("--raw", action="store_true", help="send the prompt as raw text, not as a chat message")
    _add_client_flags(generate)
    generate.set_defaults(handler=_run_generate)

    chat = commands.add_parser("chat", help="interactive terminal chat with a running worker")
    chat.add_argument("--system", help="system prompt")
    _add_client_flags(chat)
    chat.set_defaults(handler=_run_chat)

    status = commands.add_parser("status", help="live workers, queue depth and KV usage, from Redis alone")
    status.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="Redis URL (default: $REDIS_URL)")
    status.add_argument("--prefix", default="llamaq", help="key prefix")
    status.add_argument("--queue", default="default", help="queue name")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=_run_status)

    from llamaq.client.gateway import add_gateway_parser

    from .bench_suite import add_bench_parser

    add_gateway_parser(commands)
    add_bench_parser(commands)

    demo = commands.add_parser("demo", help="embedded Valkey + one worker + a simulated multi-user chat")
    demo.add_argument("--users", type=int, default=8)
    demo.add_argument("--turns", type=int, default=3)
    demo.add_argument("--max-tokens", type=int, default=48)
    _add_engine_flags(demo)
    demo.set_defaults(handler=_run_demo)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-ctx", type=int, default=16384, help="KV cells over all sequences (as llama-server -c)")
    parser.add_argument("--parallel", type=int, default=8, help="most sequences decoded in one step")
    parser.add_argument("--n-batch", type=int, default=512, help="token budget of one decode step")
    parser.add_argument(
        "--kv-unified",
        action="store_true",
        help="one KV buffer shared by all sequences (output may then vary with traffic)",
    )
    parser.add_argument(
        "--kv-type",
        choices=[t.value for t in KvType],
        default=KvType.Q8_0.value,
        help="KV cache type; only q8_0 keeps greedy output independent of traffic",
    )
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    parser.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="clear each sequence when its request ends instead of keeping its KV for reuse",
    )


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="Redis URL (default: $REDIS_URL)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def _engine_args(args: argparse.Namespace) -> list[str]:
    """The engine flags again, as a worker command line."""
    flags = [
        "--n-ctx",
        str(args.n_ctx),
        "--parallel",
        str(args.parallel),
        "--n-batch",
        str(args.n_batch),
        "--kv-type",
        args.kv_type,
        "--n-gpu-layers",
        str(args.n_gpu_layers),
    ]
    if args.kv_unified:
        flags.append("--kv-unified")
    if not args.prefix_cache:
        flags.append("--no-prefix-cache")
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags


def _sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _client_url(args: argparse.Namespace) -> str:
    if not args.redis_url:
        sys.exit("llamaq: no --redis-url and no REDIS_URL; point it at the worker's Redis (the worker prints it)")
    url: str = args.redis_url
    return url


def _run_worker(args: argparse.Namespace) -> int:
    from .service import run_worker
    from .settings import WorkerSettings, default_threads

    settings = WorkerSettings(
        redis_url=args.redis_url,
        model_path=args.model,
        n_ctx=args.n_ctx,
        parallel=args.parallel,
        n_batch=args.n_batch,
        kv_unified=args.kv_unified,
        kv_type=KvType(args.kv_type),
        prefix_cache=args.prefix_cache,
        threads=args.threads or default_threads(),
        n_gpu_layers=args.n_gpu_layers,
        prefix=args.prefix,
        queue=args.queue,
        drain_timeout_s=args.drain_timeout,
        conversation_ttl_s=args.conversation_ttl,
        state_dir=args.state_dir,
        state_dir_max_bytes=args.state_dir_max_mb << 20,
        swap_min_tokens=args.swap_min_tokens,
        restore_tolerance=args.restore_tolerance,
        metrics_port=None if args.no_metrics else args.metrics_port,
        max_backlog=args.max_backlog,
        max_tenant_in_flight=args.max_tenant_in_flight,
        max_tenant_backlog=args.max_tenant_backlog,
        limits=Limits(
            max_entry_bytes=args.max_entry_bytes,
            max_messages=args.max_messages,
            max_tokens=args.max_request_tokens,
            max_text_chars=args.max_text_chars,
        ),
        metrics_host=args.metrics_host,
        heartbeat_ttl_s=args.heartbeat_ttl,
        max_deliveries=args.max_deliveries,
    )
    return run_worker(settings)


def _run_generate(args: argparse.Namespace) -> int:
    from llamaq.client.terminal import run_generate

    return asyncio.run(run_generate(_client_url(args), args.prompt, chat=not args.raw, params=_sampling_params(args)))


def _run_chat(args: argparse.Namespace) -> int:
    from llamaq.client.terminal import run_chat

    return asyncio.run(run_chat(_client_url(args), _sampling_params(args), args.system))


def _run_status(args: argparse.Namespace) -> int:
    from llamaq.protocol import Keys

    from .status import collect_status, print_status

    status = asyncio.run(collect_status(_client_url(args), Keys(args.prefix, args.queue)))
    print_status(status, sys.stdout, as_json=args.json)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.users, args.turns, args.max_tokens, _engine_args(args))


if __name__ == "__main__":
    sys.exit(main())
