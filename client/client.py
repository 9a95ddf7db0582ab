"""Async client: adds requests to a queue's stream and reads every reply stream of one client with one XREAD."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import Any, Unpack

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskGroup
from redis.exceptions import RedisError

from llamaq.protocol import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE,
    ENQUEUE_SCRIPT,
    REQUEST_FIELD,
    ConversationCommand,
    ConversationOp,
    DoneEvent,
    ErrorCode,
    Event,
    Keys,
    Refusal,
    Request,
    RequestKind,
    TokenEvent,
    encode_request,
    is_valid_id,
)
from llamaq.protocol.admission import SLOT_GRACE_S, SLOT_TTL_S
from llamaq.protocol.keys import is_valid_name

from .connection import open_redis
from .errors import RequestFailed, succeeded
from .in_flight import CANCEL_TTL_S, CLEANUP_TIMEOUT_S, Inflight
from .options import MessageLike, RequestOptions, chat_message, resolve_url, sampling_params
from .reply_reader import ReplyReader
from .request_handle import Completion, RequestHandle

WAKE_TTL_S = 3600
REFUSALS = {
    Refusal.BACKLOG_FULL: "the queue's backlog is full; try again later",
    Refusal.TENANT_IN_FLIGHT: "this tenant has as many requests in flight as the queue allows; try again later",
    Refusal.TENANT_BACKLOG: "this tenant has as many requests waiting in the queue as it allows; try again later",
}


class Client:
    """Async client for one queue; use as `async with Client.from_url(url) as client`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
        tenant: str | None = None,
        block_ms: int = 2000,
        deadline_grace_s: float = 5.0,
        drain_s: float = 30.0,
    ) -> None:
        self.client_id = client_id or secrets.token_hex(8)
        if not is_valid_id(self.client_id):
            raise ValueError(f"client id {self.client_id!r} must be 8 to 64 characters of [A-Za-z0-9_-]")
        if tenant is not None and not is_valid_name(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1 to 64 characters of [A-Za-z0-9_.-]")
        self.tenant = tenant
        """The tenant of every request and conversation operation that names none; None: the client id owns them."""
        self.keys = Keys(prefix=prefix, queue=queue)
        self.wake_key = self.keys.wake(self.client_id)
        self._url = url
        # A worker reports a missed deadline itself; the grace lets that report win over the local timer.
        self._deadline_grace_s = deadline_grace_s
        self._replies = ReplyReader(self.keys, self.client_id, block_ms=block_ms, drain_s=drain_s)
        self._redis: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._tasks: TaskGroup | None = None

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
        tenant: str | None = None,
    ) -> Client:
        """A client for `url`, or for $REDIS_URL when url is None; `tenant` is the default tenant of its requests."""
        return cls(resolve_url(url), prefix=prefix, queue=queue, client_id=client_id, tenant=tenant)

    async def __aenter__(self) -> Client:
        self._redis = open_redis(self._url)
        # The reader blocks in XREAD, so it needs a connection that nothing else waits on.
        self._reader = open_redis(self._url)
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._replies.run, self._reader, self._redis)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._redis is not None and self._reader is not None and self._tasks is not None
        # Shielded: a client left because of a cancellation must still cancel its requests and close sockets.
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await self._replies.close_all(self._commands())
        self._tasks.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the task group, so it leaves `async with` as itself
            # rather than wrapped in an ExceptionGroup; the reader only ever ends by this cancellation.
            await self._tasks.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.aclose()
                await self._redis.aclose()

    async def submit(
        self,
        *,
        messages: Iterable[MessageLike] | None = None,
        prompt: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> RequestHandle:
        """Send a chat (messages) or completion (prompt) request and return its handle."""
        self._commands()
        request = self._new_request(messages, prompt, options)
        return await self._send(request, options.get("deadline_s"), bool(options.get("wait_if_overloaded")))

    async def _enqueue(
        self, commands: aioredis.Redis, request: Request, wait_if_overloaded: bool, deadline_s: float | None
    ) -> bytes | str:
        """Add the request under the queue's bounds (its backlog, and its tenant's requests in flight and waiting):
        `overloaded` at once when one is reached, or wait for room (up to the deadline) when asked to."""
        payload = encode_request(request, self.keys)
        give_up_at = None if deadline_s is None else anyio.current_time() + deadline_s
        slot_s = SLOT_TTL_S if deadline_s is None else deadline_s + SLOT_GRACE_S
        tenant_keys = self.keys.tenant_in_flight(request.owner), self.keys.tenant_backlog(request.owner)
        delay = 0.05
        while True:
            pipe = commands.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(self.wake_key, WAKE_TTL_S)
            pipe.eval(
                ENQUEUE_SCRIPT,
                4,
                self.keys.requests,
                self.keys.config,
                *tenant_keys,
                payload,
                REQUEST_FIELD,
                request.key,
                max(1, int(slot_s * 1000)),
            )
            *_, entry_id = await pipe.execute()
            if isinstance(entry_id, bytes | str):
                entry: bytes | str = entry_id
                return entry
            if not wait_if_overloaded or (give_up_at is not None and anyio.current_time() + delay > give_up_at):
                raise RequestFailed(ErrorCode.OVERLOADED, REFUSALS.get(entry_id, REFUSALS[Refusal.BACKLOG_FULL]))
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _send(
        self, request: Request, deadline_s: float | None, wait_if_overloaded: bool = False
    ) -> RequestHandle:
        commands = self._commands()
        if self._replies.failure is not None:
            raise RequestFailed(ErrorCode.INTERNAL, self._replies.failure)
        reply_key = self.keys.reply(self.client_id, request.id)
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        inflight = Inflight(request.id, send, receive)
        self._replies.inflight[reply_key] = inflight
        try:
            inflight.entry_id = await self._enqueue(commands, request, wait_if_overloaded, deadline_s)
        except BaseException:
            # pop: a reader that died meanwhile has cleared the table already; the real error must surface.
            self._replies.inflight.pop(reply_key, None)
            inflight.close()
            # Cut short mid-flight, the request may have been queued anyway: make sure no worker spends on it.
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True), suppress(RedisError):
                await self.cancel(request.id)
            raise
        give_up_at = None if deadline_s is None else anyio.current_time() + deadline_s + self._deadline_grace_s
        return RequestHandle(self, inflight, give_up_at)

    async def stream_chat(
        self, messages: Iterable[MessageLike], **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[TokenEvent | DoneEvent, None]:
        """Yield a chat's token events, then its DoneEvent; raise RequestFailed on an error event."""
        async with await self.submit(messages=messages, **options) as handle:
            async for event in handle:
                yield succeeded(event, handle.id)

    async def stream_completion(
        self, prompt: str, **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[TokenEvent | DoneEvent, None]:
        """Yield a raw prompt's token events, then its DoneEvent; raise RequestFailed on an error event."""
        async with await self.submit(prompt=prompt, **options) as handle:
            async for event in handle:
                yield succeeded(event, handle.id)

    async def chat(self, messages: Iterable[MessageLike], **options: Unpack[RequestOptions]) -> Completion:
        """Run a chat request to the end and return the whole answer."""
        async with await self.submit(messages=messages, **options) as handle:
            return await handle.result()

    async def completion(self, prompt: str, **options: Unpack[RequestOptions]) -> Completion:
        """Run a raw-prompt request to the end and return the whole answer."""
        async with await self.submit(prompt=prompt, **options) as handle:
            return await handle.result()

    async def submit_choices(
        self,
        n: int,
        *,
        messages: Iterable[MessageLike] | None = None,
        prompt: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> list[RequestHandle]:
        """Send `n` independent generations of one prompt, each its own request and event stream.

        The worker computes the shared prompt once and copies it into the others. With a seed, choice i is
        sampled with seed + i, so each choice equals that request sent alone with its seed.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        history = None if messages is None else [chat_message(m) for m in messages]
        seed = options.get("seed")
        handles = []
        for index in range(n):
            choice_options = dict(options)
            if seed is not None:
                choice_options["seed"] = seed + index
            handles.append(await self.submit(messages=history, prompt=prompt, **choice_options))  # type: ignore[arg-type]
        return handles

    async def chat_choices(
        self, messages: Iterable[MessageLike], n: int, **options: Unpack[RequestOptions]
    ) -> list[Completion]:
        """Run `n` generations of one chat to the end (see submit_choices)."""
        return await _results(await self.submit_choices(n, messages=messages, **options))

    async def completion_choices(self, prompt: str, n: int, **options: Unpack[RequestOptions]) -> list[Completion]:
        """Run `n` generations of one raw prompt to the end (see submit_choices)."""
        return await _results(await self.submit_choices(n, prompt=prompt, **options))

    async def get_conversation(self, conversation: str, *, tenant: str | None = None) -> dict[str, Any]:
        """A named conversation's stored history: messages (chat) or text (completion), and its token count.

        Like every conversation operation, it acts on the conversations of `tenant` (default: the client's own
        tenant, else the client id); another owner's conversation answers as an unknown one."""
        return await self._operate(conversation, ConversationCommand(ConversationOp.GET), tenant)

    async def rewind_conversation(
        self,
        conversation: str,
        *,
        to_message: int | None = None,
        drop_tokens: int | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """Cut a chat back to its first `to_message` messages, or a completion conversation by `drop_tokens`."""
        command = ConversationCommand(ConversationOp.REWIND, to_message=to_message, drop_tokens=drop_tokens)
        return await self._operate(conversation, command, tenant)

    async def fork_conversation(self, conversation: str, into: str | None = None, *, tenant: str | None = None) -> str:
        """Start a new conversation as a copy of this one (its KV is reused on its next turn); its id."""
        into = into or secrets.token_hex(16)
        await self._operate(conversation, ConversationCommand(ConversationOp.FORK, into=into), tenant)
        return into

    async def delete_conversation(self, conversation: str, *, tenant: str | None = None) -> None:
        """Forget a conversation: its history in Redis and the KV the worker cached for it."""
        await self._operate(conversation, ConversationCommand(ConversationOp.DELETE), tenant)

    async def save_state(self, conversation: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Have the worker write the conversation's KV to its state directory, kept until deleted."""
        return await self._operate(conversation, ConversationCommand(ConversationOp.SAVE_STATE), tenant)

    async def load_state(self, conversation: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Have a worker load the conversation's saved KV into its cache (verified) ahead of the next turn."""
        return await self._operate(conversation, ConversationCommand(ConversationOp.LOAD_STATE), tenant)

    async def list_states(self, *, tenant: str | None = None) -> list[dict[str, Any]]:
        """The saved and swapped KV states of the tenant's (else this client's) conversations in the state
        directory of the worker that answers."""
        result = await self._operate(None, ConversationCommand(ConversationOp.LIST_STATES), tenant)
        states: list[dict[str, Any]] = result["states"]
        return states

    async def delete_state(self, conversation: str, *, tenant: str | None = None) -> int:
        """Delete the conversation's state files (its history stays); how many there were."""
        result = await self._operate(conversation, ConversationCommand(ConversationOp.DELETE_STATE), tenant)
        return int(result["deleted"])

    async def _operate(
        self, conversation: str | None, command: ConversationCommand, tenant: str | None
    ) -> dict[str, Any]:
        request = Request(
            id=secrets.token_hex(16),
            client_id=self.client_id,
            kind=RequestKind.OP,
            conversation=conversation,
            command=command,
            created=time.time(),
            tenant=tenant or self.tenant,
        )
        async with await self._send(request, None) as handle:
            return await handle.outcome()

    async def cancel(self, request_id: str) -> None:
        """Ask the worker to stop one of this client's requests; its final event still arrives."""
        await self._commands().set(self.keys.cancel(self.client_id, request_id), 1, ex=CANCEL_TTL_S)

    def _new_request(
        self, messages: Iterable[MessageLike] | None, prompt: str | None, options: Mapping[str, Any]
    ) -> Request:
        if (messages is None) == (prompt is None):
            raise TypeError("pass exactly one of messages (chat) or prompt (completion)")
        params, deadline_s = sampling_params(options)
        now = time.time()
        return Request(
            id=secrets.token_hex(16),
            client_id=self.client_id,
            kind=RequestKind.CHAT if messages is not None else RequestKind.COMPLETION,
            messages=tuple(chat_message(m) for m in messages or ()),
            prompt=prompt or "",
            params=params,
            deadline=None if deadline_s is None else now + deadline_s,
            created=now,
            conversation=options.get("conversation"),
            append=bool(options.get("append", False)),
            priority=int(options.get("priority", 0)),
            tenant=options.get("tenant") or self.tenant,
            cache_salt=options.get("cache_salt"),
        )

    def _commands(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("use the client inside `async with`")
        return self._redis


async def _results(handles: list[RequestHandle]) -> list[Completion]:
    """Every handle's Completion, in order; a failure cancels the requests still running."""
    # The requests all run on the worker already; reading them one after the other costs no time.
    async with AsyncExitStack() as stack:
        for handle in handles:
            await stack.enter_async_context(handle)
        return [await handle.result() for handle in handles]
