"""llamaq's engine driven in-process, without Redis: requests go straight into an EngineLoop and its events are
timed in its emit callback, the point where the worker would hand them to the publisher."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from types import TracebackType

from llamaq.protocol import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    Request,
    RequestKind,
    SamplingParams,
    TokenEvent,
)

from .bench_load import Trace, chat_messages, request_index
from .engine import Engine
from .engine_loop import EngineLoop, Outgoing, StepStats

MakeRequest = Callable[[int], Request]


def chat_request(max_tokens: int) -> MakeRequest:
    """Request `index` of the shared workload as a greedy chat request."""
    client_id = secrets.token_hex(8)

    def make(index: int) -> Request:
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in chat_messages(index))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return Request(f"bench{index:08d}", client_id, RequestKind.CHAT, messages=messages, params=params)

    return make


def completion_request(prompt: str, max_tokens: int) -> MakeRequest:
    """Request `index` as a greedy raw-text completion of `prompt` (numbered, so each is its own prompt)."""
    client_id = secrets.token_hex(8)

    def make(index: int) -> Request:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return Request(
            f"bench{index:08d}", client_id, RequestKind.COMPLETION, prompt=f"{index}. {prompt}", params=params
        )

    return make


class EngineDriver:
    """Closed-loop users feeding one EngineLoop on its own thread; use as a context manager."""

    def __init__(self, engine: Engine, token_budget: int, prefix_cache: bool = True) -> None:
        self.loop = EngineLoop(engine, token_budget, self._emit, prefix_cache)
        self.steps: list[tuple[float, StepStats]] = []
        """(time.monotonic() at emit, the step's stats) for every step of the last run."""
        self._entries: dict[str, tuple[Trace, int, int]] = {}
        self._make: MakeRequest = chat_request(1)
        self._requests_per_user = 1
        self._left = 0
        self._finished = threading.Event()

    def __enter__(self) -> EngineDriver:
        self.loop.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.loop.stop(drain_timeout_s=0.0)
        self.loop.join(60.0)

    def run(self, n_users: int, requests_per_user: int, make: MakeRequest, timeout_s: float) -> list[Trace]:
        """Every user sends requests_per_user requests, each after the previous one ended; their traces."""
        self._make, self._requests_per_user = make, requests_per_user
        self._entries, self.steps = {}, []
        self._left = n_users * requests_per_user
        self._finished.clear()
        for user in range(n_users):
            self._send(user, 0)
        if not self._finished.wait(timeout_s):
            raise RuntimeError(f"the engine did not finish {self._left} requests in {timeout_s:.0f} s")
        return sorted((trace for trace, _, _ in self._entries.values()), key=lambda t: t.index)

    def _send(self, user: int, turn: int) -> None:
        request = self._make(request_index(user, turn, self._requests_per_user))
        trace = Trace(request_index(user, turn, self._requests_per_user), time.monotonic())
        # Registered before submitting: the engine thread may emit for it at once.
        self._entries[request.key] = (trace, user, turn)
        self.loop.submit(request, trace.sent_at)

    def _emit(self, out: list[Outgoing], stats: StepStats | None) -> None:
        """Runs on the engine thread once per step: time every event, start each user's next request."""
        now = time.monotonic()
        if stats is not None:
            self.steps.append((now, stats))
        for item in out:
            entry = self._entries.get(item.request_key)
            if entry is None:
                continue
            trace, user, turn = entry
            event = item.event
            if isinstance(event, TokenEvent):
                if event.tokens:
                    trace.token_times.append(now)
                continue
            if isinstance(event, DoneEvent):
                trace.done_at, trace.n_tokens = now, event.usage.completion_tokens
                trace.worker_ttft_ms = event.timings.ttft_ms
            elif isinstance(event, ErrorEvent):
                trace.error = f"{event.code}: {event.message}"
            self._left -= 1
            if turn + 1 < self._requests_per_user:
                self._send(user, turn + 1)
            elif self._left == 0:
                self._finished.set()
