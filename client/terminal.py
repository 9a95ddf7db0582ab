"""Terminal front ends: one streamed answer (`llamaq generate`) and an interactive chat (`llamaq chat`)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import Any

import anyio
from redis.exceptions import RedisError

from llamaq.protocol import ChatMessage, DoneEvent, ErrorCode, TokenEvent

from .client import Client
from .errors import RequestFailed
from .options import sampling_params

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
PROMPT = "you> "


async def run_generate(url: str | None, prompt: str, *, chat: bool, params: Mapping[str, Any]) -> int:
    """Stream one answer to stdout and a usage line to stderr; return the process exit code."""
    try:
        sampling_params(params)
        client = Client.from_url(url)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        async with client:
            if chat:
                events = client.stream_chat([ChatMessage("user", prompt)], **params)
            else:
                events = client.stream_completion(prompt, **params)
            done = await _print_stream(events)
    except RequestFailed as exc:
        print(f"\nerror: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(flush=True)
    print(usage_line(done), file=sys.stderr)
    return EXIT_OK


async def run_chat(url: str | None, params: Mapping[str, Any], system: str | None = None) -> int:
    """Hold a conversation on the terminal until /exit or EOF; Ctrl-C stops the reply being written."""
    try:
        sampling_params(params)
        client = Client.from_url(url)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    messages = [ChatMessage("system", system)] if system else []
    print("/exit or Ctrl-D leaves; Ctrl-C stops a reply", file=sys.stderr)
    try:
        async with client, anyio.create_task_group() as tasks:
            interrupts = _Interrupts()
            tasks.start_soon(interrupts.watch)
            try:
                await _converse(client, messages, params, interrupts)
            finally:
                tasks.cancel_scope.cancel()
    except RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def usage_line(done: DoneEvent) -> str:
    """One line on how a request went: finish reason, token counts, time to first token, speed."""
    usage, timings = done.usage, done.timings
    rate = usage.completion_tokens / (timings.decode_ms / 1000) if timings.decode_ms > 0 else 0.0
    return (
        f"[{done.finish_reason}] {usage.prompt_tokens} prompt ({usage.cached_tokens} cached) + "
        f"{usage.completion_tokens} completion tokens, first token {timings.ttft_ms:.0f} ms, "
        f"{rate:.1f} tokens/s, {timings.total_ms / 1000:.2f} s"
    )


async def _converse(
    client: Client, messages: list[ChatMessage], params: Mapping[str, Any], interrupts: _Interrupts
) -> None:
    while True:
        try:
            line = await anyio.to_thread.run_sync(input, PROMPT)
        except EOFError:
            print()
            return
        if line.strip() == "/exit":
            return
        if not line.strip():
            continue
        messages.append(ChatMessage("user", line))
        parts: list[str] = []
        with interrupts.catch() as scope:
            await _reply(client, messages, params, parts)
        print(" [stopped]" if scope.cancelled_caught else "", flush=True)
        # A stopped reply keeps what was shown, so the history matches the screen; an empty turn is forgotten,
        # so the history keeps alternating between user and assistant.
        answer = "".join(parts)
        if answer:
            messages.append(ChatMessage("assistant", answer))
        else:
            messages.pop()


async def _reply(client: Client, messages: list[ChatMessage], params: Mapping[str, Any], parts: list[str]) -> None:
    """Print one streamed answer and collect its text in parts; a failed request leaves parts empty."""
    try:
        async with aclosing(client.stream_chat(messages, **params)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                    print(event.text, end="", flush=True)
    except RequestFailed as exc:
        parts.clear()
        print(f"\nerror: {exc.code}: {exc.message}", file=sys.stderr)


async def _print_stream(events: AsyncGenerator[TokenEvent | DoneEvent, None]) -> DoneEvent:
    async with aclosing(events):
        async for event in events:
            if isinstance(event, DoneEvent):
                return event
            print(event.text, end="", flush=True)
    raise RequestFailed(ErrorCode.INTERNAL, "the reply ended without a final event")


class _Interrupts:
    """Turns Ctrl-C into cancelling the reply being written; at the prompt it only reminds how to leave."""

    def __init__(self) -> None:
        self._current: anyio.CancelScope | None = None

    async def watch(self) -> None:
        """Handle SIGINT until cancelled; signals can only be caught on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if self._current is not None:
                    self._current.cancel()
                else:
                    print(f"\n(/exit or Ctrl-D leaves)\n{PROMPT}", end="", flush=True)

    @contextmanager
    def catch(self) -> Iterator[anyio.CancelScope]:
        """A scope that Ctrl-C cancels while it is open."""
        with anyio.CancelScope() as scope:
            self._current = scope
            try:
                yield scope
            finally:
                self._current = None
