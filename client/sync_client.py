"""Blocking wrapper around the async Client, for code that has no event loop: it runs one in a portal thread."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import ExitStack
from types import TracebackType
from typing import Unpack

from anyio.from_thread import BlockingPortal, start_blocking_portal

from llamaq.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE, DoneEvent, TokenEvent

from .client import Client
from .options import MessageLike, RequestOptions, resolve_url
from .request_handle import Completion


class SyncClient:
    """Blocking client; use as `with SyncClient.from_url(url) as client`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
        tenant: str | None = None,
    ) -> None:
        self.client = Client(url, prefix=prefix, queue=queue, client_id=client_id, tenant=tenant)
        self._portal: BlockingPortal | None = None
        self._stack = ExitStack()

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
        tenant: str | None = None,
    ) -> SyncClient:
        """A client for `url`, or for $REDIS_URL when url is None; `tenant` is the default tenant of its requests."""
        return cls(resolve_url(url), prefix=prefix, queue=queue, client_id=client_id, tenant=tenant)

    def __enter__(self) -> SyncClient:
        with ExitStack() as stack:
            portal = stack.enter_context(start_blocking_portal())
            stack.enter_context(portal.wrap_async_context_manager(self.client))
            self._stack = stack.pop_all()
            self._portal = portal
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._portal = None
        self._stack.__exit__(exc_type, exc, tb)

    def chat(self, messages: Iterable[MessageLike], **options: Unpack[RequestOptions]) -> Completion:
        """Run a chat request to the end and return the whole answer."""
        return self._running().call(lambda: self.client.chat(messages, **options))

    def completion(self, prompt: str, **options: Unpack[RequestOptions]) -> Completion:
        """Run a raw-prompt request to the end and return the whole answer."""
        return self._running().call(lambda: self.client.completion(prompt, **options))

    def chat_choices(
        self, messages: Iterable[MessageLike], n: int, **options: Unpack[RequestOptions]
    ) -> list[Completion]:
        """Run `n` generations of one chat (see Client.submit_choices)."""
        return self._running().call(lambda: self.client.chat_choices(messages, n, **options))

    def completion_choices(self, prompt: str, n: int, **options: Unpack[RequestOptions]) -> list[Completion]:
        """Run `n` generations of one raw prompt (see Client.submit_choices)."""
        return self._running().call(lambda: self.client.completion_choices(prompt, n, **options))

    def stream_chat(
        self, messages: Iterable[MessageLike], **options: Unpack[RequestOptions]
    ) -> Iterator[TokenEvent | DoneEvent]:
        """Yield a chat's token events, then its DoneEvent; raise RequestFailed on an error event."""
        return self._iterate(self.client.stream_chat(messages, **options))

    def stream_completion(self, prompt: str, **options: Unpack[RequestOptions]) -> Iterator[TokenEvent | DoneEvent]:
        """Yield a raw prompt's token events, then its DoneEvent; raise RequestFailed on an error event."""
        return self._iterate(self.client.stream_completion(prompt, **options))

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop one of this client's requests."""
        self._running().call(self.client.cancel, request_id)

    def _iterate(self, events: AsyncGenerator[TokenEvent | DoneEvent, None]) -> Iterator[TokenEvent | DoneEvent]:
        portal = self._running()
        try:
            while True:
                try:
                    event = portal.call(events.__anext__)
                except StopAsyncIteration:
                    return
                yield event
        finally:
            # Closing the async generator in its own loop is what sends the cancel after an early break.
            if self._portal is portal:
                portal.call(events.aclose)

    def _running(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeError("use the client inside `with`")
        return self._portal
