"""One call's answer as server-sent events: the events of its choices merged as they come, in OpenAI's chunks.

The status line waits for every choice's first event: a request the worker refuses at once (context length,
a bad parameter, a passed deadline) still gets its proper HTTP status instead of a 200 followed by an error
chunk. Once the stream is open, a failure is sent as an `{"error": ...}` event and the stream ends without
`[DONE]`, as llama-server does; the OpenAI client raises it as an APIError.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence

from aiohttp import web

from llamaq.protocol import DoneEvent, ErrorCode, ErrorEvent, Event, FinishReason, TokenEvent, Usage

from .errors import RequestFailed
from .gateway_openai import ApiError, failure_error
from .gateway_responses import DONE_LINE, Shape, sse
from .request_handle import RequestHandle

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told otherwise, which would hold every token back.
    "X-Accel-Buffering": "no",
}


class ClientGone(Exception):
    """The caller closed the connection while its stream was being written."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the caller closed the connection")
        self.response = response


async def stream_answer(
    request: web.Request,
    shape: Shape,
    handles: Sequence[RequestHandle],
    on_open: Callable[[], None],
    on_usage: Callable[[Usage], None],
) -> web.StreamResponse:
    """Write the choices' events as SSE; raise ApiError when the call fails before the stream opens."""
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    waiting = set(range(len(handles)))
    early: list[tuple[int, Event]] = []
    usages: list[Usage | None] = [None] * len(handles)
    async with contextlib.aclosing(_merged(handles)) as events:
        async for index, event in events:
            failure = _failure(event)
            if not response.prepared:
                if failure is not None:
                    raise failure_error(failure)
                early.append((index, event))
                waiting.discard(index)
                if waiting:
                    continue
                try:
                    await _open(request, response, shape, len(handles))
                except ConnectionError:
                    raise ClientGone(response) from None
                on_open()
                pending, early = early, []
            else:
                pending = [(index, event)]
            try:
                for pending_index, pending_event in pending:
                    await _write_event(response, shape, pending_index, pending_event, usages, on_usage)
            except ConnectionError:
                raise ClientGone(response) from None
            if failure is not None:
                return response
    try:
        if shape.call.include_usage:
            await response.write(sse(shape.usage_chunk([u for u in usages if u is not None])))
        await response.write(DONE_LINE)
        await response.write_eof()
    except ConnectionError:
        raise ClientGone(response) from None
    return response


async def _open(request: web.Request, response: web.StreamResponse, shape: Shape, n_choices: int) -> None:
    await response.prepare(request)
    if shape.chat:
        # Chat streams open every choice with its role, as OpenAI's do.
        for index in range(n_choices):
            await response.write(sse(shape.chunk(index, None)))


async def _write_event(
    response: web.StreamResponse,
    shape: Shape,
    index: int,
    event: Event,
    usages: list[Usage | None],
    on_usage: Callable[[Usage], None],
) -> None:
    failure = _failure(event)
    if failure is not None:
        await response.write(sse(failure_error(failure).body()))
    elif isinstance(event, TokenEvent):
        # Empty texts are held-back partial characters or stop strings: nothing to show yet.
        if event.text:
            await response.write(sse(shape.chunk(index, event.text)))
    elif isinstance(event, DoneEvent):
        usages[index] = event.usage
        on_usage(event.usage)
        await response.write(sse(shape.chunk(index, "", event.finish_reason.value)))


def _failure(event: Event) -> RequestFailed | None:
    """What ends a choice without an answer: an error event, or a cancel that this gateway did not ask for."""
    if isinstance(event, ErrorEvent):
        return RequestFailed(event.code, event.message)
    if isinstance(event, DoneEvent) and event.finish_reason is FinishReason.CANCELLED:
        return RequestFailed(ErrorCode.CANCELLED, "the worker stopped before the request finished; try again")
    if not isinstance(event, TokenEvent | DoneEvent):
        return RequestFailed(ErrorCode.INTERNAL, "a generation request got an unexpected event")
    return None


async def _merged(handles: Sequence[RequestHandle]) -> AsyncGenerator[tuple[int, Event], None]:
    """Every handle's events tagged with its index, in arrival order, until each has its final event."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for event in handle:
                await queue.put((index, event))
        finally:
            await queue.put(None)

    pumps = [asyncio.create_task(pump(index, handle)) for index, handle in enumerate(handles)]
    try:
        running = len(pumps)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def completion_failure(finish_reason: FinishReason) -> ApiError | None:
    """The error a non-streamed choice gets when the worker cancelled it on its own."""
    if finish_reason is FinishReason.CANCELLED:
        return failure_error(RequestFailed(ErrorCode.CANCELLED, "the worker stopped before the request finished"))
    return None
