"""Opening Redis: one server, or a Redis Cluster, from one URL.

`redis+cluster://host:port/0` (or `rediss+cluster://` with TLS, or any URL with `?cluster=true`) opens redis-py's
cluster client from that seed node. Every multi-key command llamaq sends stays inside one hash tag (a client's
keys, a queue's keys, a conversation's key), so the same code runs on both.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """True when a URL asks for a Redis Cluster."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return parts.scheme in _CLUSTER_SCHEMES or query.get("cluster", "").lower() in {"1", "true", "yes"}


def open_redis(url: str, **options: Any) -> aioredis.Redis:
    """A client for the server or cluster a URL names (typed as Redis: llamaq uses the commands both share)."""
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "cluster"]
    plain = urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES.get(parts.scheme, parts.scheme), query=urlencode(query)))
    options.pop("health_check_interval", None)  # per-node connections check themselves
    return cast(aioredis.Redis, RedisCluster.from_url(plain, **options))
