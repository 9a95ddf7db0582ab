"""Writes to Redis in one pipeline, each command's reply looked at: errors of the server's state waited out, any
other error charged to the one request it belongs to.

redis-py raises the first error of a pipeline for all of it unless `raise_on_error=False`; then every reply is
there to read, an exception in place of each failed command. A write is the commands of one request that go
together (a history saved before its final event); an event's XADD is a write of its own, since it is the one
command that must never be sent twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llamaq.protocol import EVENT_FIELD

from .redis_errors import Backoff, is_transient


@dataclass
class Write:
    """Commands of one round trip that belong to one request (`owner`: its key, or an entry id)."""

    owner: str
    add: Callable[[Pipeline], object]
    n: int | None = None
    """The number of the event this write carries, if it carries one."""
    final: bool = False
    """The event is the request's last."""
    entry: tuple[str, bytes] | None = None
    """The request entry (stream, id) the write answers for: held back by a fence."""
    ttl_set_at: float | None = None
    """For a running reply stream's EXPIRE: when it was sent (monotonic), noted on the ticket once written."""


@dataclass
class Outcome:
    """What Redis did with the writes."""

    replies: dict[int, object] = field(default_factory=dict)
    """Each successful write's last reply, by its index."""
    refused: dict[str, BaseException] = field(default_factory=dict)
    """The first lasting error of each owner whose writes failed."""
    written: set[int] = field(default_factory=set)
    """Indexes of the writes Redis took."""
    fenced: set[str] = field(default_factory=set)
    """Owners whose entries the fence says this worker no longer holds: not written."""


class Fence(Protocol):
    """What may be written now (lease.py): checked before every round trip."""

    def fence_needed(self) -> bool:
        """True when settle() must run before the next round trip."""

    async def settle(self) -> None:
        """Wait until writing is allowed again."""

    def holds(self, entry: tuple[str, bytes]) -> bool:
        """Whether writes for this request entry may still go out."""


Retrying = Callable[[BaseException, Backoff], None]


async def write_all(redis: aioredis.Redis, writes: list[Write], fence: Fence | None, retrying: Retrying) -> Outcome:
    """Send the writes in one pipeline, again (with backoff) those that met an error the server recovers from,
    until each is taken or refused for good."""
    outcome = Outcome()
    to_send = list(range(len(writes)))
    backoff = Backoff()
    while to_send:
        if fence is not None and fence.fence_needed():
            await fence.settle()
            fenced = [i for i in to_send if _fenced_off(writes[i], fence)]
            outcome.fenced.update(writes[i].owner for i in fenced)
            to_send = [i for i in to_send if i not in fenced]
            if not to_send:
                break
        pipe = redis.pipeline(transaction=False)
        spans = []
        for index in to_send:
            start = len(pipe)
            writes[index].add(pipe)
            spans.append((index, start, len(pipe)))
        try:
            replies: list[object] = await pipe.execute(raise_on_error=False)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Replaying the pipeline may write an event twice; clients drop duplicates by event number.
            retrying(exc, backoff)
            await backoff.wait()
            continue
        retry: list[int] = []
        for index, start, end in spans:
            errors = [r for r in replies[start:end] if isinstance(r, BaseException)]
            if not errors:
                outcome.written.add(index)
                outcome.replies[index] = replies[end - 1] if end > start else None
            elif all(is_transient(e) for e in errors):
                retry.append(index)
            else:
                outcome.refused.setdefault(writes[index].owner, next(e for e in errors if not is_transient(e)))
        to_send = [index for index in retry if writes[index].owner not in outcome.refused]
        if to_send:
            retrying(next(r for r in replies if isinstance(r, BaseException)), backoff)
            await backoff.wait()
    return outcome


def _fenced_off(write: Write, fence: Fence) -> bool:
    return write.entry is not None and not fence.holds(write.entry)


# The commands of a write, bound to their keys by functools.partial and added to a pipeline when it is built.


def xadd(key: str, data: bytes, pipe: Pipeline) -> object:
    """XADD of one event."""
    return pipe.xadd(key, {EVENT_FIELD: data})


def expire(key: str, ttl_s: int, pipe: Pipeline) -> object:
    """EXPIRE of a key."""
    return pipe.expire(key, ttl_s)


def exists(key: str, pipe: Pipeline) -> object:
    """EXISTS of a key (a cancel check)."""
    return pipe.exists(key)


def xack(stream: str, group: str, entry_id: bytes, pipe: Pipeline) -> object:
    """XACK of an answered entry."""
    return pipe.xack(stream, group, entry_id)


def xdel(stream: str, entry_id: bytes, pipe: Pipeline) -> object:
    """XDEL of an answered entry."""
    return pipe.xdel(stream, entry_id)


def zrem(key: str, member: str, pipe: Pipeline) -> object:
    """ZREM of a request from its tenant's counts."""
    return pipe.zrem(key, member)


def exists_any(keys: list[str], pipe: Pipeline) -> object:
    """EXISTS of several keys of one hash slot: how many of them exist."""
    return pipe.exists(*keys)
