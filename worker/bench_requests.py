"""The open-loop benchmark's workload: the shipped chat request set (bench/data/chat_requests.json, made by
bench/make_chat_requests.py) and seeded Poisson arrival times."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

REQUESTS_FILE = Path(__file__).resolve().parents[1] / "bench" / "data" / "chat_requests.json"
"""In a source checkout; `--requests-file` points elsewhere."""


@dataclass(frozen=True)
class ChatRequest:
    """One request of the set: its chat and the tokens it may generate."""

    index: int
    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs."""
    max_tokens: int

    def message_dicts(self) -> list[dict[str, str]]:
        """The chat as the client takes it."""
        return [{"role": role, "content": content} for role, content in self.messages]


def load_requests(path: Path | None = None) -> list[ChatRequest]:
    """Every request of the set, in its order."""
    path = path or REQUESTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it ships in the source tree (bench/make_chat_requests.py)")
    document = json.loads(path.read_text())
    return [
        ChatRequest(i, tuple((m["role"], m["content"]) for m in r["messages"]), int(r["max_tokens"]))
        for i, r in enumerate(document["requests"])
    ]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets in seconds of n requests arriving as a Poisson process of `rate` per second; the first at 0."""
    rng = random.Random(seed)
    offsets, at = [], 0.0
    for _ in range(n):
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


def requests_for_rate(available: int, rate: float, window_s: float, min_requests: int) -> int:
    """How many requests a run at `rate` sends: window_s of arrivals, at least min_requests, at most the set."""
    return max(1, min(available, max(min_requests, round(rate * window_s))))
