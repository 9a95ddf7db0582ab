"""Where a request left off: the events a worker that died had already published on its reply stream.

A request reclaimed from a dead worker resumes rather than restarts: its new worker computes the prompt plus the
tokens already sent and goes on numbering events from there, so the client sees every event exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from llamaq.protocol import EVENT_FIELD, ProtocolError, TokenEvent, decode_event


@dataclass(frozen=True)
class Resume:
    """What a reply stream already holds for a request."""

    tokens: tuple[int, ...] = ()
    """Generated tokens already published, in order."""
    texts: tuple[str, ...] = ()
    """Text deltas already published, in order."""
    next_event: int = 0
    finished: bool = False
    """A final event was written: the request is answered, only its ack was lost."""

    def usable(self, n_vocab: int, max_tokens: int) -> bool:
        """True when a new worker can take these tokens over: every id in the vocabulary (an id outside it
        aborts llama.cpp), no more tokens than the request allows, one text delta per event."""
        return (
            len(self.tokens) <= max_tokens
            and len(self.texts) == self.next_event
            and all(0 <= token < n_vocab for token in self.tokens)
        )


async def published_so_far(redis: aioredis.Redis, reply_key: str) -> Resume:
    """Read a reply stream from the start; events out of order or unreadable end the scan (the client will see
    a gap and fail the request rather than receive a guess)."""
    entries: Any = await redis.xrange(reply_key)
    tokens: list[int] = []
    texts: list[str] = []
    expected = 0
    for _entry_id, fields in entries:
        data = fields.get(EVENT_FIELD)
        try:
            event = None if data is None else decode_event(data)
        except ProtocolError:
            event = None
        if event is None or event.n != expected:
            if event is not None and event.n < expected:
                continue  # a publish retried after a lost reply repeats an event
            break
        if not isinstance(event, TokenEvent):
            return Resume(tuple(tokens), tuple(texts), expected + 1, finished=True)
        tokens.extend(event.tokens)
        texts.append(event.text)
        expected += 1
    return Resume(tuple(tokens), tuple(texts), expected)
