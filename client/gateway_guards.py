"""What a browser must not be able to do to a gateway: the Host header allowlist (DNS rebinding), JSON bodies only
(a cross-site form can POST text/plain without a preflight), and CORS, off unless origins are configured.

A page on any site can make the victim's browser send requests to a gateway on localhost or on the victim's
network: with DNS rebinding its own host name resolves to the gateway, and its requests then carry that name in
`Host`; a plain HTML form posts `text/plain` to any address. Refusing unknown Host names and non-JSON bodies
stops both, and without CORS headers no other origin can read an answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from .gateway_openai import ApiError

ANY = "*"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Answered whatever the Host: probes and scrapers address a pod by its IP, and these pages hold no caller's data."""
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-Conversation-Id"
CORS_MAX_AGE_S = 600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def default_allowed_hosts(bound: str) -> tuple[str, ...]:
    """The names a gateway bound to `bound` accepts unless told otherwise: that address and loopback."""
    return (*LOOPBACK_NAMES, bound.strip("[]").lower())


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets or a trailing dot, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, colon, port = header.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        header = name
    return header.rstrip(".")


@dataclass(frozen=True)
class Guards:
    """The gateway's browser-facing rules: accepted Host names and CORS origins."""

    allowed_hosts: tuple[str, ...]
    """Names (a leading dot also allows subdomains), or `*` for any."""
    cors_origins: tuple[str, ...] = ()
    """Origins whose pages may call the API (`*`: any); none turns CORS off."""

    def host_allowed(self, header: str | None) -> bool:
        """True for a Host header naming an allowed host (or absent: only non-browser clients omit it)."""
        if header is None or ANY in self.allowed_hosts:
            return True
        name = host_name(header)
        return any(name == allowed or (allowed.startswith(".") and name.endswith(allowed)) for allowed in self.hosts)

    @property
    def hosts(self) -> Iterable[str]:
        """The allowed names as they are compared."""
        return (
            host_name(allowed) if not allowed.startswith(".") else allowed.lower() for allowed in self.allowed_hosts
        )

    def origin_allowed(self, origin: str | None) -> bool:
        """True when CORS is on and the origin is one of those configured."""
        return origin is not None and (ANY in self.cors_origins or origin in self.cors_origins)

    def add_cors(self, app: web.Application) -> None:
        """When origins are configured: answer CORS preflights, and put CORS headers on every answer."""
        if self.cors_origins:
            app.router.add_route("OPTIONS", "/{path:.*}", self.preflight)
            app.on_response_prepare.append(self._cors_headers)

    @web.middleware
    async def host_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """403 for a Host header that names no allowed host (DNS rebinding protection)."""
        header = request.headers.get("Host")
        if request.path not in PROBE_PATHS and not self.host_allowed(header):
            raise ApiError(
                403,
                f"Host {header!r} is not allowed (DNS rebinding protection); start the gateway with "
                f"--allowed-hosts naming it to accept it",
                type="invalid_request_error",
                code="host_not_allowed",
            )
        return await handler(request)

    async def preflight(self, request: web.Request) -> web.Response:
        """OPTIONS: a CORS preflight, answered for configured origins only."""
        if not self.origin_allowed(request.headers.get("Origin")):
            raise ApiError(403, "this origin may not call the API (--cors-origins)", code="origin_not_allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
            },
        )

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        response.headers.add("Vary", "Origin")
        if self.origin_allowed(origin):
            assert origin is not None
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"


def require_json(request: web.Request) -> None:
    """415 unless a POST body is declared JSON: browsers send text/plain and form bodies cross-site unasked."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            f"the body must be JSON sent with Content-Type: application/json, not {request.content_type!r}",
            code="unsupported_media_type",
        )
