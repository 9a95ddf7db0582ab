"""The client's one reader: a single blocking XREAD over every reply stream, dispatching and forgetting them."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llamaq.protocol import EVENT_FIELD, ErrorCode, Keys

from .in_flight import CANCEL_TTL_S, Inflight


class ReplyReader:
    """The requests of one client still waiting for replies, by reply key, and the task that reads them all."""

    def __init__(self, keys: Keys, client_id: str, *, block_ms: int, drain_s: float) -> None:
        self.keys = keys
        self.client_id = client_id
        self.wake_key = keys.wake(client_id)
        self.inflight: dict[str, Inflight] = {}
        self.failure: str | None = None
        self._block_ms = block_ms
        self._drain_s = drain_s

    async def run(self, reader: aioredis.Redis, commands: aioredis.Redis) -> None:
        """The one reader: XREAD all reply streams plus the wake stream, dispatch, delete finished streams."""
        wake_id: bytes | str = b"0-0"
        retries = 0
        try:
            while True:
                streams = self._streams_to_read(wake_id)
                try:
                    if retries:
                        await self._fail_lost(commands)
                    response = await reader.xread(streams, block=self._block_ms)  # type: ignore[arg-type]
                except (RedisConnectionError, RedisTimeoutError):
                    # The streams keep every event, so reading again from the last ids loses nothing.
                    retries += 1
                    await anyio.sleep(min(0.05 * 2**retries, 1.0))
                    continue
                retries = 0
                finished = []
                for key, entries in _stream_entries(response):
                    if key == self.wake_key:
                        wake_id = entries[-1][0]
                    elif self._dispatch(key, entries):
                        finished.append(key)
                await self._forget(commands, finished)
        except Exception as exc:  # noqa: BLE001 - any reader death must fail the waiting requests, not hang them
            self.failure = f"reply reader failed: {type(exc).__name__}: {exc}"
            for inflight in self.inflight.values():
                inflight.fail(ErrorCode.INTERNAL, self.failure)
            self.inflight.clear()

    async def _fail_lost(self, commands: aioredis.Redis) -> None:
        """After a lost connection: if Redis lost its data (a restart without persistence), requests that have
        no reply stream yet will never be answered; fail them now instead of letting them wait forever.

        The client's own wake stream tells: it is written at every submit and lives long, so its absence means
        the server forgot this client. Only the client's own keys are read, as a least-privilege ACL allows.
        """
        waiting = [(key, i) for key, i in self.inflight.items() if i.next_n == 0 and i.entry_id is not None]
        if not waiting or await commands.exists(self.wake_key):
            return
        pipe = commands.pipeline(transaction=False)
        for key, _ in waiting:
            pipe.exists(key)
        found = await pipe.execute()
        for (key, inflight), reply_exists in zip(waiting, found, strict=True):
            if reply_exists:
                continue
            inflight.fail(ErrorCode.INTERNAL, "request lost: Redis lost its state (restarted?); send it again")
            self.inflight.pop(key, None)
            # A worker that read it before the loss must not spend a sequence on it.
            with suppress(RedisError):
                await commands.set(self.keys.cancel(self.client_id, inflight.request_id), 1, ex=CANCEL_TTL_S)

    async def close_all(self, commands: aioredis.Redis) -> None:
        """Cancel every request whose consumer never finished and end their event streams."""
        pipe = commands.pipeline(transaction=False)
        for inflight in self.inflight.values():
            # Abandoned ones too: their own cancel may have been cut short by a native asyncio cancellation.
            pipe.set(self.keys.cancel(self.client_id, inflight.request_id), 1, ex=CANCEL_TTL_S)
            inflight.close()
        pipe.delete(self.wake_key)
        self.inflight.clear()
        with suppress(RedisError):
            await pipe.execute()

    def _streams_to_read(self, wake_id: bytes | str) -> dict[str, bytes | str]:
        now = anyio.current_time()
        for key, inflight in list(self.inflight.items()):
            # A worker that never answers a cancelled request must not grow the XREAD forever.
            if inflight.abandoned_at is not None and now - inflight.abandoned_at > self._drain_s:
                del self.inflight[key]
                inflight.close()
        return {self.wake_key: wake_id} | {key: inflight.last_id for key, inflight in self.inflight.items()}

    def _dispatch(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> bool:
        """Hand a reply stream's new entries to its request; True when its final event was among them."""
        inflight = self.inflight.get(key)
        if inflight is None:
            return False
        for entry_id, fields in entries:
            inflight.last_id = entry_id
            if inflight.accept(fields.get(EVENT_FIELD)):
                return True
        return False

    async def _forget(self, commands: aioredis.Redis, reply_keys: list[str]) -> None:
        """Delete finished reply streams; cancel the requests the client itself failed."""
        if not reply_keys:
            return
        pipe = commands.pipeline(transaction=False)
        pipe.delete(*reply_keys)
        for key in reply_keys:
            inflight = self.inflight.pop(key, None)
            if inflight is not None and inflight.failed_locally:
                pipe.set(self.keys.cancel(self.client_id, inflight.request_id), 1, ex=CANCEL_TTL_S)
        with suppress(RedisError):
            await pipe.execute()


def _stream_entries(response: Any) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """XREAD's reply as (key, entries) pairs, whichever RESP version redis-py spoke."""
    pairs = response.items() if isinstance(response, dict) else (response or [])
    result = []
    for key, entries in pairs:
        # RESP3 wraps each stream's entry list in one more list.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        name = key.decode() if isinstance(key, bytes) else key
        result.append((name, [(i, f) for i, f in entries if i is not None and f is not None]))
    return result
