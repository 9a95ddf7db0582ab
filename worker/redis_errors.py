"""Redis errors sorted by what to do about them: wait out a state of the server (out of memory, a replica, a failed
snapshot, a lost connection), or fail the one request whose keys refused a command (WRONGTYPE on a key a client
replaced). Also the backoff every retry loop of the worker uses."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TRANSIENT_CODES = frozenset(
    {"OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"}
)
"""Error replies that describe the server, not the command: the same command succeeds once the server recovers
(memory freed, snapshots writable again, a failover done)."""


def error_code(error: BaseException) -> str:
    """A failed command's Redis error code (OOM, WRONGTYPE...), or "connection"/"timeout" for a lost round trip."""
    if isinstance(error, RedisTimeoutError):
        return "timeout"
    # redis-py strips the code from the message of the errors it maps to classes and keeps it here.
    status: object = getattr(error, "status_code", None)
    if isinstance(status, str) and status:
        return status
    if isinstance(error, RedisConnectionError):
        return "connection"
    first = str(error).split(" ", 1)[0]
    return first if first.isalpha() and first.isupper() else "ERR"


def is_transient(error: BaseException) -> bool:
    """True when retrying the same command later can succeed."""
    return isinstance(error, RedisConnectionError | RedisTimeoutError) or error_code(error) in TRANSIENT_CODES


class Backoff:
    """Delays between retries, doubling from `first_s` up to `max_s`; reset() after a success."""

    def __init__(self, first_s: float = 0.05, max_s: float = 2.0) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self.delay_s = first_s

    async def wait(self) -> None:
        """Sleep the current delay, then double it."""
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self._max_s)

    def reset(self) -> None:
        """Start again from the first delay."""
        self.delay_s = self._first_s
