"""A simulated multi-user chat: many users talk at once, each through its own client, with live progress."""

from __future__ import annotations

import math
import shutil
import sys
from contextlib import aclosing
from dataclasses import dataclass
from typing import TextIO

import anyio
from redis.exceptions import RedisError

from llamaq.protocol import ChatMessage, DoneEvent, TokenEvent

from .client import Client
from .errors import RequestFailed

SYSTEM_PROMPT = "You are a friendly assistant. Answer in at most three short sentences."
TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("astronomy", ("Why is the sky dark at night?", "How far is the nearest star?", "Could we ever travel there?")),
    ("cooking", ("How do I make a simple tomato sauce?", "Which herbs suit it?", "How long does it keep?")),
    ("history", ("Who built the first printing press?", "Why did it matter so much?", "What came before it?")),
    ("programming", ("What is a hash table?", "When is a list faster?", "How does Python's dict grow?")),
    ("gardening", ("When should I plant tulips?", "How deep should the bulbs go?", "Do they need much water?")),
    ("music", ("What makes a chord sound sad?", "Why do major chords sound happy?", "What is a suspended chord?")),
    ("travel", ("What should I pack for a week in Iceland?", "Is it expensive?", "What is one thing not to miss?")),
    ("fitness", ("How often should a beginner run?", "How do I avoid shin splints?", "Is stretching before useful?")),
)
DEMO_TEMPERATURE = 0.7
# Each user samples with its own fixed seed, so a rerun on the same model tells much the same story.
DEMO_SEED = 4242
REDRAW_S = 0.1


@dataclass(frozen=True)
class DemoSummary:
    """What a demo run measured; latencies are client side, from sending a request to its first token."""

    users: int
    requests: int
    errors: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None


async def run_demo(
    url: str | None, *, users: int = 8, turns: int = 3, max_tokens: int = 48, out: TextIO = sys.stdout
) -> DemoSummary:
    """Run `users` concurrent conversations of `turns` turns each, show progress on `out`, print a summary."""
    board = _Board(out, [_User(i, TOPICS[i % len(TOPICS)][0], turns) for i in range(users)])
    turns_done: list[_Turn] = []
    started = anyio.current_time()
    async with anyio.create_task_group() as display:
        display.start_soon(board.redraw_forever)
        async with anyio.create_task_group() as conversations:
            for user in board.users:
                conversations.start_soon(_converse, url, user, max_tokens, board, turns_done)
        display.cancel_scope.cancel()
    board.draw()
    summary = summarise(users, turns_done, anyio.current_time() - started)
    print(summary_text(summary), file=out, flush=True)
    return summary


def summarise(users: int, turns: list[_Turn], wall_s: float) -> DemoSummary:
    """Aggregate the measured turns of a run."""
    tokens = sum(t.completion_tokens for t in turns)
    ttfts_ms = sorted(t.ttft_s * 1000 for t in turns if t.ttft_s is not None)
    return DemoSummary(
        users=users,
        requests=len(turns),
        errors=sum(1 for t in turns if t.error is not None),
        completion_tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=percentile(ttfts_ms, 50),
        ttft_p95_ms=percentile(ttfts_ms, 95),
    )


def summary_text(summary: DemoSummary) -> str:
    """The printed summary of a run."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    return (
        f"{summary.users} users, {summary.requests} requests, {summary.errors} errors\n"
        f"{summary.completion_tokens} completion tokens in {summary.wall_s:.2f} s: "
        f"{summary.tokens_per_s:.1f} tokens/s overall\n"
        f"time to first token: p50 {ms(summary.ttft_p50_ms)}, p95 {ms(summary.ttft_p95_ms)}"
    )


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class _User:
    """One simulated user and what its status line shows."""

    index: int
    topic: str
    turns: int
    turn: int = 0
    state: str = "waiting"
    tokens: int = 0
    tail: str = ""


@dataclass(frozen=True)
class _Turn:
    """The measurements of one request."""

    ttft_s: float | None
    completion_tokens: int
    error: str | None


async def _converse(url: str | None, user: _User, max_tokens: int, board: _Board, turns_done: list[_Turn]) -> None:
    questions = TOPICS[user.index % len(TOPICS)][1]
    messages = [ChatMessage("system", SYSTEM_PROMPT)]
    async with Client.from_url(url) as client:
        for turn in range(user.turns):
            user.turn = turn + 1
            messages.append(ChatMessage("user", questions[turn % len(questions)]))
            answer, measured = await _ask(client, messages, user, max_tokens, board)
            turns_done.append(measured)
            if answer:
                messages.append(ChatMessage("assistant", answer))
            else:
                messages.pop()
    user.state = "finished"


async def _ask(
    client: Client, messages: list[ChatMessage], user: _User, max_tokens: int, board: _Board
) -> tuple[str, _Turn]:
    """Stream one answer into the user's status line; return its text and measurements."""
    user.state, user.tokens, user.tail = "asking", 0, ""
    board.note(user, f"asks: {messages[-1].content}")
    parts: list[str] = []
    ttft_s: float | None = None
    sent = anyio.current_time()
    completion_tokens = 0
    seed = DEMO_SEED + user.index
    try:
        events = client.stream_chat(messages, max_tokens=max_tokens, temperature=DEMO_TEMPERATURE, seed=seed)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, DoneEvent):
                    completion_tokens = event.usage.completion_tokens
                    break
                ttft_s = ttft_s if ttft_s is not None else anyio.current_time() - sent
                _show_token(user, event, parts)
    except (RequestFailed, RedisError) as exc:
        user.state = "error"
        board.note(user, f"error: {exc}")
        return "", _Turn(ttft_s, 0, str(exc))
    user.state = "done"
    elapsed = anyio.current_time() - sent
    board.note(user, f"done: {completion_tokens} tokens in {elapsed:.2f} s, first after {(ttft_s or 0) * 1e3:.0f} ms")
    return "".join(parts), _Turn(ttft_s, completion_tokens, None)


def _show_token(user: _User, event: TokenEvent, parts: list[str]) -> None:
    user.state = "writing"
    user.tokens += len(event.tokens)
    parts.append(event.text)
    user.tail = (user.tail + event.text).replace("\n", " ")[-60:]


class _Board:
    """Progress display: one redrawn status line per user on a terminal, a line per step anywhere else."""

    def __init__(self, out: TextIO, users: list[_User]) -> None:
        self.out = out
        self.users = users
        self.live = out.isatty()
        self._drawn = False

    def note(self, user: _User, message: str) -> None:
        """Report one step of a user's conversation (only when not redrawing status lines)."""
        if not self.live:
            print(f"user {user.index} turn {user.turn}/{user.turns}: {message}", file=self.out, flush=True)

    async def redraw_forever(self) -> None:
        """Redraw the status lines until cancelled."""
        while self.live:
            self.draw()
            await anyio.sleep(REDRAW_S)

    def draw(self) -> None:
        """Draw every user's status line over the previous drawing."""
        if not self.live:
            return
        width = shutil.get_terminal_size().columns - 1
        if self._drawn:
            self.out.write(f"\x1b[{len(self.users)}A\r")
        for user in self.users:
            line = (
                f"user {user.index:>2} {user.topic:<11} turn {user.turn}/{user.turns} "
                f"{user.state:<8} {user.tokens:>4} tok | {user.tail}"
            )
            self.out.write("\x1b[2K" + line[:width] + "\n")
        self.out.flush()
        self._drawn = True
