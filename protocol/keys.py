"""Redis key names, laid out for Redis Cluster.

Every key of one request carries the hash tag of the client that sent it, so a client reads all its reply
streams with one multi-key XREAD in one slot. The request stream carries the tag of its queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "llamaq"
DEFAULT_QUEUE = "default"
CONSUMER_GROUP = "workers"

# Ids go inside key names and hash tags: keep them to characters that cannot open or close a tag.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_valid_id(value: str) -> bool:
    """True for a request or client id that is safe inside a key name."""
    # fullmatch: `$` in match() also matches before a final newline, which would put "\n" into a key's hash tag.
    return bool(_ID_PATTERN.fullmatch(value))


def is_valid_name(value: str) -> bool:
    """True for a key prefix or queue name that is safe inside a key name."""
    return bool(_NAME_PATTERN.fullmatch(value))


def is_valid_owner(value: str) -> bool:
    """True for a Request.owner: `t.` and a tenant name, or `c.` and a client id."""
    kind, dot, name = value.partition(".")
    return bool(dot) and ((kind == "t" and is_valid_name(name)) or (kind == "c" and is_valid_id(name)))


@dataclass(frozen=True)
class Keys:
    """All key names under one prefix and queue."""

    prefix: str = DEFAULT_PREFIX
    queue: str = DEFAULT_QUEUE

    def __post_init__(self) -> None:
        if not is_valid_name(self.prefix) or not is_valid_name(self.queue):
            raise ValueError(f"invalid key prefix or queue name: {self.prefix!r}, {self.queue!r}")

    @property
    def requests(self) -> str:
        """The stream that clients add requests to and workers read as one consumer group."""
        return f"{self.prefix}:{{q:{self.queue}}}:requests"

    @property
    def group(self) -> str:
        """The consumer group every worker of this queue joins."""
        return CONSUMER_GROUP

    def reply(self, client_id: str, request_id: str) -> str:
        """The stream a request's events are written to."""
        return f"{self.prefix}:{{c:{client_id}}}:reply:{request_id}"

    def cancel(self, client_id: str, request_id: str) -> str:
        """The key whose existence asks the worker to stop a request."""
        return f"{self.prefix}:{{c:{client_id}}}:cancel:{request_id}"

    def conversation(self, owned_conversation: str) -> str:
        """The hash that holds a named conversation's history, under the conversation's own hash tag; the id is
        qualified by its owner (Request.owned_conversation), so every owner has ids of its own."""
        return f"{self.prefix}:{{v:{owned_conversation}}}:conversation"

    def wake(self, client_id: str) -> str:
        """A client's own stream, written to wake its blocked XREAD when it starts a new request."""
        return f"{self.prefix}:{{c:{client_id}}}:wake"

    @property
    def workers(self) -> str:
        """The set of worker ids that have a heartbeat on this queue (expired ones are removed by readers)."""
        return f"{self.prefix}:{{q:{self.queue}}}:workers"

    def heartbeat(self, worker: str) -> str:
        """A worker's heartbeat hash (id, model, capacity, load) with a short TTL, in the queue's slot."""
        return f"{self.prefix}:{{q:{self.queue}}}:worker:{worker}"

    @property
    def config(self) -> str:
        """The queue's settings that clients honour (the backlog bound), written by its workers."""
        return f"{self.prefix}:{{q:{self.queue}}}:config"

    def inbox(self, worker: str) -> str:
        """A worker's own request stream: turns of conversations it holds, handed over by other workers."""
        return f"{self.prefix}:{{q:{self.queue}}}:inbox:{worker}"

    def owner(self, owned_conversation: str) -> str:
        """Which worker holds a conversation's KV (valid while that worker's heartbeat lives)."""
        return f"{self.prefix}:{{v:{owned_conversation}}}:owner"

    def taken(self, worker: str) -> str:
        """The set of a worker's request entries that other workers claimed while its heartbeat was missing."""
        return f"{self.prefix}:{{q:{self.queue}}}:taken:{worker}"

    def tenant_in_flight(self, owner: str) -> str:
        """A sorted set of an owner's requests sent and not yet answered (Request.key, scored by expiry in ms)."""
        return f"{self.prefix}:{{q:{self.queue}}}:tenant:{owner}:in_flight"

    def tenant_backlog(self, owner: str) -> str:
        """A sorted set of an owner's requests sent and not yet read by a worker (as tenant_in_flight)."""
        return f"{self.prefix}:{{q:{self.queue}}}:tenant:{owner}:backlog"
