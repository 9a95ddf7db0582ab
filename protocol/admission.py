"""Enqueueing under bounds: the script a client runs to add a request, and the fields of the queue's config that
bound it: the whole backlog, and per tenant the requests in flight and those still waiting in the stream.

Checking the counts and adding the entry in one server-side script makes every bound exact under any number of
clients, in one round trip. All keys carry the queue's hash tag, so the script runs on one shard of a cluster.

Per tenant (per Request.owner) two sorted sets hold its requests by Request.key, scored with the time in ms
after which a slot counts no more: `in_flight` (sent, not yet answered) and `backlog` (sent, not yet read by a
worker). The script adds to both; a worker removes a request from `backlog` when it reads the entry and from
both when it writes the final event. A request that is never answered (its entry lost, malformed, or trimmed)
holds its slots only until they expire: its deadline plus SLOT_GRACE_S, else SLOT_TTL_S.
"""

from __future__ import annotations

from enum import IntEnum

MAX_BACKLOG_FIELD = "max_backlog"
"""Field of Keys.config: entries the request stream may hold before new requests are refused (0: no bound)."""
MAX_TENANT_IN_FLIGHT_FIELD = "max_tenant_in_flight"
"""Field of Keys.config: requests one tenant may have sent and not yet had answered (0: no bound)."""
MAX_TENANT_BACKLOG_FIELD = "max_tenant_backlog"
"""Field of Keys.config: requests of one tenant that may wait in the stream, not yet read by a worker (0: none)."""
SLOT_TTL_S = 3600
"""How long a request without a deadline counts against its tenant's limits at most."""
SLOT_GRACE_S = 60
"""How long after its deadline a request still counts (a worker answers a missed deadline itself)."""


class Refusal(IntEnum):
    """Why the enqueue script did not add a request (its integer reply); the client answers `overloaded`."""

    BACKLOG_FULL = 1
    """The request stream holds max_backlog entries."""
    TENANT_IN_FLIGHT = 2
    """The tenant has max_tenant_in_flight requests sent and not yet answered."""
    TENANT_BACKLOG = 3
    """The tenant has max_tenant_backlog requests waiting in the stream."""


ENQUEUE_SCRIPT = """
local function bound(field)
  return tonumber(redis.call('HGET', KEYS[2], field) or '0') or 0
end
local function count(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end
local function hold(key, member, expires, ttl)
  redis.call('ZADD', key, expires, member)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
local backlog = bound('max_backlog')
if backlog > 0 and redis.call('XLEN', KEYS[1]) >= backlog then
  return 1
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local in_flight = bound('max_tenant_in_flight')
if in_flight > 0 and count(KEYS[3], now) >= in_flight then
  return 2
end
local waiting = bound('max_tenant_backlog')
if waiting > 0 and count(KEYS[4], now) >= waiting then
  return 3
end
local id = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[1])
local ttl = tonumber(ARGV[4])
hold(KEYS[3], ARGV[3], now + ttl, ttl)
hold(KEYS[4], ARGV[3], now + ttl, ttl)
return id
"""
"""KEYS: request stream, queue config, the tenant's in-flight set, the tenant's backlog set (Keys.requests, .config,
.tenant_in_flight(owner), .tenant_backlog(owner)). ARGV: encoded request, the entry's field name, Request.key, how
long the request may count against its tenant in ms. Returns the new entry id, or a Refusal (an integer)."""
