"""`llamaq gateway`: an OpenAI-compatible HTTP server on top of the queue.

The gateway is stateless: every call becomes requests in the queue's stream and its answer is read back from their
reply streams, so any number of gateways can run behind a load balancer, in front of any number of workers. One
process holds one queue client (one blocking XREAD for all its calls), one Redis connection for worker presence,
its API keys (digests only) and its own metrics registry.

Routes and their behaviour live in gateway_routes.py; request and response mapping in gateway_openai.py and
gateway_responses.py; streaming in gateway_stream.py; live workers in gateway_presence.py; keys in
gateway_auth.py; metrics in gateway_metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from aiohttp import web

from llamaq.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE, Keys, is_valid_id

from .client import Client
from .connection import open_redis
from .gateway_auth import ENV_VAR, ApiKeys
from .gateway_guards import Guards, default_allowed_hosts
from .gateway_metrics import GatewayMetrics
from .gateway_presence import WorkerPresence
from .gateway_routes import Gateway

log = logging.getLogger("llamaq.gateway")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 4 << 20
"""Room for the largest request a worker takes by default (400,000 characters, up to 4 UTF-8 bytes each)."""
SHUTDOWN_TIMEOUT_S = 30.0
"""How long open calls may still finish after SIGTERM before they are cancelled through the queue."""

READY_LINE = "llamaq gateway ready"
"""Printed once the gateway accepts connections; scripts wait for it."""

GATEWAY = web.AppKey("gateway", Gateway)


@dataclass(frozen=True)
class GatewaySettings:
    """Everything a gateway needs to run."""

    redis_url: str
    prefix: str = DEFAULT_PREFIX
    queue: str = DEFAULT_QUEUE
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    worker_check_s: float = 1.0
    """How long a read of the live workers is reused before the next call reads them again."""
    process_metrics: bool = True
    """Resident memory and CPU time in /metrics; off for several gateways in one process (tests)."""
    client_id: str | None = None
    """The queue client's id (its keys' hash tag); None draws a random one. Under Redis ACLs that pin users to
    client ids, give each gateway process its own fixed id."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host header names answered (`*`: any; a leading dot: subdomains too); None: loopback and the bound address."""
    cors_origins: tuple[str, ...] = ()
    """Origins whose browser pages may call the API (`*`: any); none: CORS off."""

    def guards(self, bound_host: str) -> Guards:
        """The Host and CORS rules of a gateway bound to `bound_host`."""
        hosts = self.allowed_hosts if self.allowed_hosts is not None else default_allowed_hosts(bound_host)
        return Guards(hosts, self.cors_origins)


def create_app(settings: GatewaySettings, bound_host: str = DEFAULT_HOST) -> web.Application:
    """The gateway's aiohttp application; its queue client and Redis connection open on startup, close on cleanup."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    metrics = GatewayMetrics(settings.process_metrics)
    gateway = Gateway(settings.api_keys, metrics, settings.max_body_bytes, settings.guards(bound_host))
    gateway.add_routes(app)
    app[GATEWAY] = gateway

    async def connected(app: web.Application) -> AsyncIterator[None]:
        # Bounded waits: a Redis that stops answering must turn into 503s, not calls that hang.
        redis = open_redis(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        client = Client(settings.redis_url, prefix=settings.prefix, queue=settings.queue, client_id=settings.client_id)
        # A client's task group must be left by the task that entered it, and aiohttp may run startup and cleanup
        # in different tasks: the client lives in a task of its own.
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        closing = asyncio.Event()
        holder = asyncio.create_task(_hold(client, opened, closing))
        try:
            await opened
            keys = Keys(settings.prefix, settings.queue)
            gateway.connect(client, WorkerPresence(redis, keys, settings.worker_check_s))
            yield
        finally:
            closing.set()
            await asyncio.gather(holder, return_exceptions=True)
            await redis.aclose()

    app.cleanup_ctx.append(connected)
    return app


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """A gateway serving in this event loop until the block ends; yields its base URL (port 0: a free one)."""
    # handler_cancellation: a caller that disconnects cancels its handler, and so its requests in the queue.
    runner = web.AppRunner(
        create_app(settings, host), handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = int(runner.addresses[0][1])
        display = f"[{host}]" if ":" in host else host
        yield f"http://{display}:{bound}"
    finally:
        await runner.cleanup()


async def _hold(client: Client, opened: asyncio.Future[None], closing: asyncio.Event) -> None:
    try:
        async with client:
            opened.set_result(None)
            await closing.wait()
    except BaseException as exc:
        if not opened.done():
            opened.set_exception(exc)
        raise


async def serve(settings: GatewaySettings, host: str, port: int, out: TextIO = sys.stdout) -> int:
    """Serve until SIGINT or SIGTERM; open calls then get SHUTDOWN_TIMEOUT_S to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_gateway(settings, host, port) as url:
        keys = settings.api_keys
        if keys.enabled:
            print(f"API keys: {len(keys)} for tenants {', '.join(sorted(keys.tenants))}", file=out)
        else:
            print(
                f"no API keys (--api-keys-file, ${ENV_VAR}): anyone who can reach {host}:{port} may use this gateway",
                file=out,
            )
        print(f"OpenAI API at {url}/v1, chat page at {url}/", file=out)
        guards = settings.guards(host)
        print(f"Host names answered: {', '.join(guards.allowed_hosts)} (--allowed-hosts)", file=out)
        print(f"CORS: {', '.join(guards.cors_origins) or 'off'} (--cors-origins)", file=out)
        print(f"queue {settings.queue!r}, key prefix {settings.prefix!r}", file=out)
        print(READY_LINE, file=out, flush=True)
        await stop.wait()
        print(f"stopping: open calls get {SHUTDOWN_TIMEOUT_S:.0f} s to finish", file=out, flush=True)
    return 0


def run_gateway(
    host: str,
    port: int,
    redis_url: str | None,
    prefix: str = DEFAULT_PREFIX,
    queue: str = DEFAULT_QUEUE,
    api_keys_file: Path | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    client_id: str | None = None,
    allowed_hosts: tuple[str, ...] | None = None,
    cors_origins: tuple[str, ...] = (),
) -> int:
    """Run a gateway in the foreground until SIGINT/SIGTERM; the process exit code."""
    url = redis_url or os.environ.get("REDIS_URL")
    if not url:
        print("llamaq gateway: no Redis URL: pass --redis-url or set REDIS_URL", file=sys.stderr)
        return 2
    try:
        Keys(prefix, queue)  # ValueError for names that cannot go into key names
        keys = ApiKeys.from_environment(api_keys_file)
        settings = GatewaySettings(
            url,
            prefix,
            queue,
            keys,
            max_body_bytes,
            client_id=client_id,
            allowed_hosts=allowed_hosts,
            cors_origins=cors_origins,
        )
        if client_id is not None and not is_valid_id(client_id):
            raise ValueError(f"--client-id {client_id!r} must be 8 to 64 characters of [A-Za-z0-9_-]")
    except (OSError, ValueError) as exc:
        print(f"llamaq gateway: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings, host, port))
    except OSError as exc:
        print(f"llamaq gateway: cannot serve on {host}:{port}: {exc}", file=sys.stderr)
        return 1


def add_gateway_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `llamaq gateway` on the `llamaq` command's subparsers."""
    parser = commands.add_parser("gateway", help="serve the OpenAI API (and a chat page) on top of the queue")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT})")
    parser.add_argument("--redis-url", default=None, help="Redis/Valkey URL (default: $REDIS_URL)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (as the workers')")
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help="queue name (as the workers')")
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        default=None,
        help=f"file of tenant:key lines; with it (or ${ENV_VAR}) every /v1 call needs Authorization: Bearer <key>",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body (413 beyond)"
    )
    parser.add_argument(
        "--client-id",
        default=None,
        help="the queue client's id (default: random); under Redis ACLs, a fixed one per gateway process",
    )
    parser.add_argument(
        "--allowed-hosts",
        type=_names,
        default=None,
        help="comma-separated Host header names to answer (a leading dot allows subdomains, * any); default: "
        "localhost, 127.0.0.1, ::1 and the --host address. Others get 403 (DNS rebinding protection)",
    )
    parser.add_argument(
        "--cors-origins",
        type=_names,
        default=(),
        help="comma-separated origins (https://chat.example.com, or *) whose browser pages may call the API; "
        "default: none, CORS off",
    )
    parser.set_defaults(handler=_run_from_args)
    return parser


def _names(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _run_from_args(args: argparse.Namespace) -> int:
    return run_gateway(
        args.host,
        args.port,
        args.redis_url,
        args.prefix,
        args.queue,
        args.api_keys_file,
        max_body_bytes=args.max_body_bytes,
        client_id=args.client_id,
        allowed_hosts=args.allowed_hosts,
        cors_origins=args.cors_origins,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m llamaq.client.gateway [--log-level L] [gateway flags]`: the gateway command on its own."""
    levels = argparse.ArgumentParser(add_help=False)
    levels.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    known, rest = levels.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="llamaq")
    add_gateway_parser(parser.add_subparsers(required=True, metavar="COMMAND"))
    args = parser.parse_args(["gateway", *rest])
    args.log_level = known.log_level
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
