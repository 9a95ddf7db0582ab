"""The gateway's HTTP routes: OpenAI's generation and model endpoints on top of the queue, probes, metrics and the
chat page, with the middleware that turns every failure into an OpenAI error object and counts every answer.

A call becomes n requests in the queue (one per choice), all held in one exit stack: whatever ends the call (the
answer sent, an error, the caller going away, which cancels the handler), leaving the stack closes their handles,
and closing a handle whose final event has not arrived sets its cancel key, so the worker frees the sequences at
its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from importlib import resources

from aiohttp import web
from redis.exceptions import RedisError

from .client import Client
from .errors import RequestFailed
from .gateway_auth import ApiKeys
from .gateway_guards import Guards, require_json
from .gateway_metrics import ANONYMOUS, CLIENT_CLOSED, GatewayMetrics
from .gateway_openai import ApiError, Call, Endpoint, failure_error, parse_body, parse_call, tenant_of_user
from .gateway_presence import WorkerPresence
from .gateway_responses import Shape
from .gateway_stream import ClientGone, completion_failure, stream_answer
from .request_handle import RequestHandle

log = logging.getLogger("llamaq.gateway")

DEFAULT_MODEL = "llamaq"
"""The model name answered when neither the call nor any live worker names one."""

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What prometheus_client's generate_latest writes."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """The routes of one gateway process and what they share: the queue client, worker presence, keys, metrics."""

    def __init__(self, keys: ApiKeys, metrics: GatewayMetrics, max_body_bytes: int, guards: Guards) -> None:
        self.keys = keys
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.guards = guards
        self._chat_page = resources.files("llamaq.client").joinpath("static/chat.html").read_bytes()
        self._client: Client | None = None
        self._presence: WorkerPresence | None = None

    def connect(self, client: Client, presence: WorkerPresence) -> None:
        """Hand the routes the queue client and the presence reader once the application has started them."""
        self._client, self._presence = client, presence

    @property
    def client(self) -> Client:
        """The queue client (open while the application runs)."""
        if self._client is None:
            raise RuntimeError("the gateway's queue client is not open")
        return self._client

    @property
    def presence(self) -> WorkerPresence:
        """The live-worker reader (open while the application runs)."""
        if self._presence is None:
            raise RuntimeError("the gateway's Redis connection is not open")
        return self._presence

    def add_routes(self, app: web.Application) -> None:
        """Register the routes and middlewares on an application."""
        app.middlewares.extend([self.answer_middleware, self.guards.host_middleware, self.auth_middleware])
        self.guards.add_cors(app)
        app.router.add_post(Endpoint.CHAT.value, self.chat_completions)
        app.router.add_post(Endpoint.COMPLETIONS.value, self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/", self.chat_page)

    # --- routes ------------------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._generate(request, Endpoint.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._generate(request, Endpoint.COMPLETIONS)

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the models the live workers run."""
        workers = await self.presence.workers()
        models: dict[str, int] = {}
        for fields in workers.values():
            name = fields.get("model") or DEFAULT_MODEL
            started = _unix_seconds(fields.get("started_at"))
            models[name] = min(models.get(name, started), started)
        data = [{"id": m, "object": "model", "created": c, "owned_by": "llamaq"} for m, c in sorted(models.items())]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        """GET /healthz: liveness. 503 only when the queue client is broken for good (its reply reader died), which
        a restart cures; Redis being away and workers being absent are /readyz's business."""
        failure = reader_failure(self.client)
        if failure is not None:
            return web.json_response({"status": "broken", "detail": failure}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """GET /readyz: 200 when Redis answers, with the number of live workers; else 503."""
        try:
            workers = await self.presence.workers()
        except RedisError as exc:
            return web.json_response({"status": "redis unreachable", "detail": str(exc)}, status=503)
        return web.json_response({"status": "ready", "workers": len(workers)})

    async def metrics_page(self, request: web.Request) -> web.Response:
        """GET /metrics in Prometheus's text format."""
        # prometheus_client's content type carries `version=`, which aiohttp's content_type argument refuses.
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def chat_page(self, request: web.Request) -> web.Response:
        """GET /: the chat page."""
        return web.Response(body=self._chat_page, content_type="text/html", charset="utf-8")

    # --- generation --------------------------------------------------------------------------------------

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = time.perf_counter()
        call = parse_call(endpoint, await self._body(request), request.headers)
        key_tenant = self.tenant(request)
        label = key_tenant or ANONYMOUS
        workers = await self.presence.require()
        model = call.model or next((w["model"] for w in workers.values() if w.get("model")), DEFAULT_MODEL)
        # The tenant owns the call's conversation and cached prompt: the API key's, else (no keys) the `user`'s,
        # else the one tenant of every anonymous caller, whichever gateway replica they reach.
        tenant = key_tenant or tenant_of_user(call.user) or ANONYMOUS
        async with AsyncExitStack() as stack:
            handles = await self._submit(stack, call, tenant)
            shape = Shape(call, handles[0].id, int(time.time()), model)
            if call.stream:
                return await self._stream(request, shape, handles, label, started)
            completions = []
            for handle in handles:
                completion = await handle.result()
                error = completion_failure(completion.finish_reason)
                if error is not None:
                    raise error
                completions.append(completion)
            for completion in completions:
                self.metrics.observe_usage(label, completion.usage)
            body = shape.completion(completions)
        self.metrics.observe_first_byte(endpoint.value, False, time.perf_counter() - started)
        return web.json_response(body)

    async def _stream(
        self, request: web.Request, shape: Shape, handles: list[RequestHandle], label: str, started: float
    ) -> web.StreamResponse:
        opened = False

        def on_open() -> None:
            nonlocal opened
            opened = True
            self.metrics.open_streams.inc()
            self.metrics.observe_first_byte(shape.call.endpoint.value, True, time.perf_counter() - started)

        try:
            return await stream_answer(
                request, shape, handles, on_open, lambda usage: self.metrics.observe_usage(label, usage)
            )
        finally:
            if opened:
                self.metrics.open_streams.dec()

    async def _submit(self, stack: AsyncExitStack, call: Call, tenant: str) -> list[RequestHandle]:
        """One request per choice, each entered into the stack at once so that any failure cancels the others."""
        options = call.options.copy()
        options["tenant"] = tenant
        seed = options.get("seed")
        prompts: list[str | None] = [None] if call.messages is not None else list(call.prompts)
        handles = []
        for prompt in prompts:
            for index in range(call.n):
                choice = options.copy()
                if seed is not None:
                    # As Client.submit_choices does: choice i equals the request sent alone with seed + i.
                    choice["seed"] = seed + index
                handle = await self.client.submit(messages=call.messages, prompt=prompt, **choice)
                handles.append(await stack.enter_async_context(handle))
        return handles

    async def _body(self, request: web.Request) -> dict[str, object]:
        require_json(request)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(self.max_body_bytes) from None
        return parse_body(raw)

    # --- middlewares -------------------------------------------------------------------------------------

    @web.middleware
    async def answer_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as an OpenAI error object with its status; every answer counted."""
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        try:
            response = await handler(request)
        except ClientGone as gone:
            self._count(request, endpoint, CLIENT_CLOSED)
            return gone.response
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the caller disconnects; the exit stack has cancelled its requests.
            self._count(request, endpoint, CLIENT_CLOSED)
            raise
        except ApiError as error:
            response = error_response(error)
        except RequestFailed as failure:
            response = error_response(failure_error(failure))
        except web.HTTPException as exc:
            # Keep what the exception says beyond its body (Allow on a 405).
            kept = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            response = error_response(ApiError(exc.status, exc.reason, type=_error_type(exc.status), headers=kept))
        except RedisError as exc:
            log.warning("Redis failed during %s: %s", request.path, exc)
            response = error_response(
                ApiError(503, "the queue cannot be reached; try again later", type="server_error", code="redis")
            )
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path)
            response = error_response(ApiError(500, "internal error", type="server_error", code="internal"))
        self._count(request, endpoint, response.status)
        return response

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With API keys configured, /v1/ needs `Authorization: Bearer <key>`; the key names the tenant."""
        # A CORS preflight never carries credentials: it is answered (or refused) by origin alone.
        needs_key = request.path.startswith("/v1/") and request.method != "OPTIONS"
        if self.keys.enabled and needs_key and self.tenant(request) is None:
            raise ApiError(
                401,
                "missing or unknown API key: send Authorization: Bearer <key>",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    def tenant(self, request: web.Request) -> str | None:
        """The tenant of the request's API key; None without keys (or without a known key)."""
        # Hashing the key again costs a microsecond and spares passing state between middleware and handler.
        return self.keys.tenant_for(request.headers.get("Authorization")) if self.keys.enabled else None

    def _count(self, request: web.Request, endpoint: str, status: int) -> None:
        if endpoint in ("/metrics", "/healthz", "/readyz"):
            return  # scrapes and probes would drown the traffic they watch
        self.metrics.observe_request(endpoint, status, self.tenant(request) or ANONYMOUS)


def reader_failure(client: Client) -> str | None:
    """Why the client's reply reader died, or None while it runs."""
    # Client has no public view of its reader's health yet: until it has, look at the reader itself.
    failure = getattr(getattr(client, "_replies", None), "failure", None)
    return failure if isinstance(failure, str) else None


def error_response(error: ApiError) -> web.Response:
    """The JSON answer of an ApiError."""
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _unix_seconds(value: str | None) -> int:
    try:
        return int(float(value or 0))
    except ValueError:
        return 0


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than {limit} bytes", code="request_too_large")


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"
