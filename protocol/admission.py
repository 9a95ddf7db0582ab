"""Enqueueing under a bounded backlog: the script a client runs to add a request, and the field that bounds it.

Checking the depth and adding the entry in one server-side script makes the bound exact under any number of
clients, in one round trip. Both keys carry the queue's hash tag, so the script runs on one shard of a cluster.
"""

from __future__ import annotations

MAX_BACKLOG_FIELD = "max_backlog"
"""Field of Keys.config: entries the request stream may hold before new requests are refused (0: no bound)."""

ENQUEUE_SCRIPT = """
local bound = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') or 0
if bound > 0 and redis.call('XLEN', KEYS[1]) >= bound then
  return false
end
return redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[1])
"""
"""KEYS: request stream, queue config. ARGV: encoded request, MAX_BACKLOG_FIELD, the entry's field name.
Returns the new entry id, or nil when the backlog is full (the client answers `overloaded`)."""
