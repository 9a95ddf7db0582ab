"""A small HTTP server for Prometheus and orchestrators: /metrics, /healthz (liveness) and /readyz (readiness).

It runs on its own daemon thread, apart from the asyncio loop and the engine thread, so a scrape or a probe is
answered even while either is busy. The worker serves it on port 9464 (Prometheus's customary exporter range) on
a configurable bind address; the gateway serves its own on its API port.

The two probe callables run on the server's threads: they must be quick and must not block, reading state the
worker already keeps (the engine thread's `alive`, the last Redis round trip's outcome, whether the consumer group
was joined) rather than doing I/O themselves.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import WorkerMetrics

log = logging.getLogger("llamaq.health_server")

DEFAULT_PORT = 9464
"""The worker's metrics and health port."""
SOCKET_TIMEOUT_S = 5.0
"""How long a connection may leave the server waiting, for its request or for room to write the answer: each
connection has its own thread, which a client that connects and says nothing must not hold for ever."""

Liveness = Callable[[], bool]
"""True while the process can make progress: its engine thread is alive."""
Readiness = Callable[[], tuple[bool, str]]
"""(True, "ready") when the worker can take requests, else (False, why): model loading, Redis unreachable..."""


class HealthServer:
    """Serves GET (and HEAD) /metrics, /healthz and /readyz for one worker; anything else is 404."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        host: str,
        port: int,
        liveness: Liveness,
        readiness: Readiness,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> None:
        self.metrics = metrics
        self.socket_timeout_s = socket_timeout_s
        self.host = host
        self._port = port
        self.liveness = liveness
        self.readiness = readiness
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served on: the one bound once started (useful when constructed with port 0)."""
        return self._port if self._server is None else int(self._server.server_address[1])

    def start(self) -> None:
        """Bind (raising OSError if the address is taken) and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the health server is already started")
        self._server = _HttpServer((self.host, self._port), self)
        # stop() waits for the serving loop to notice, which it does once per poll interval (0.5 s by default).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="llamaq-health", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop serving and release the port; a no-op when not started."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._port = self.port
        server.shutdown()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def respond(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        """Status, content type and body for a GET of path."""
        route = urlsplit(path).path
        if route == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if route == "/healthz":
            alive = self._probe_liveness()
            return (HTTPStatus.OK, _TEXT, b"ok\n") if alive else (HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, b"dead\n")
        if route == "/readyz":
            ready, reason = self._probe_readiness()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return status, _TEXT, f"{reason}\n".encode()
        return HTTPStatus.NOT_FOUND, _TEXT, b"not found: try /metrics, /healthz or /readyz\n"

    def _probe_liveness(self) -> bool:
        # A probe that raises means the worker is broken: answer 503 rather than drop the connection.
        try:
            return self.liveness()
        except Exception:
            log.exception("the liveness probe failed")
            return False

    def _probe_readiness(self) -> tuple[bool, str]:
        try:
            return self.readiness()
        except Exception as exc:
            log.exception("the readiness probe failed")
            return False, f"readiness probe failed: {exc}"


_TEXT = "text/plain; charset=utf-8"


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], health: HealthServer) -> None:
        # The class default is IPv4 only; a literal IPv6 bind address ("::") needs the other family.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.health = health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 (the default): one request per connection, so stop() leaves no idle keep-alive threads behind.
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # A read or write that times out ends the connection (handle_one_request catches the TimeoutError).
        self.connection.settimeout(self.server.health.socket_timeout_s)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        status, content_type, body = self.server.health.respond(self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Probes arrive every few seconds: keep them out of the worker's output unless asked for.
        log.debug("%s " + format, self.address_string(), *args)
