"""`llamaq status`: every live worker, the queue's depth and KV usage, from Redis alone."""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from llamaq.client.connection import open_redis
from llamaq.protocol import Keys

from .heartbeat import live_workers
from .queue_stats import queue_depth


async def collect_status(url: str, keys: Keys) -> dict[str, Any]:
    """Workers (from their heartbeats) and the queue's depth, as one map."""
    redis = open_redis(url)
    try:
        workers = await live_workers(redis, keys)
        depth = await queue_depth(redis, keys)
    finally:
        await redis.aclose()
    now = time.time()
    rows = []
    for worker, fields in workers.items():
        rows.append(
            {
                "worker": worker,
                "model": fields.get("model", "?"),
                "age_s": round(now - float(fields.get("updated_at", now)), 1),
                "running": int(fields.get("running", 0)),
                "parallel": int(fields.get("parallel", 0)),
                "waiting": int(fields.get("waiting", 0)),
                "kv_cells_used": int(fields.get("kv_cells_used", 0)),
                "kv_cells_total": int(fields.get("kv_cells_total", 0)),
                "kv_layout": fields.get("kv_layout", "?"),
                "pending": depth.pending_by_consumer.get(worker, 0),
            }
        )
    return {
        "queue": keys.requests,
        "undelivered": depth.undelivered,
        "pending": depth.pending,
        "stream_length": depth.length,
        "workers": rows,
    }


def print_status(status: dict[str, Any], out: TextIO, as_json: bool = False) -> None:
    """Write a status map as a table (or JSON)."""
    if as_json:
        json.dump(status, out, indent=2)
        out.write("\n")
        return
    undelivered = "?" if status["undelivered"] is None else status["undelivered"]
    out.write(f"queue {status['queue']}: {undelivered} waiting for a worker, {status['pending']} being served\n")
    workers = status["workers"]
    if not workers:
        out.write("no live worker\n")
        return
    header = f"{'worker':40} {'model':28} {'beat':>6} {'running':>9} {'waiting':>7} {'pending':>7} {'KV used':>16}"
    out.write(header + "\n")
    for w in workers:
        total = w["kv_cells_total"] or 1
        kv = f"{w['kv_cells_used']}/{w['kv_cells_total']} {100 * w['kv_cells_used'] / total:3.0f}%"
        out.write(
            f"{w['worker'][:40]:40} {w['model'][:28]:28} {w['age_s']:>5}s {w['running']:>4}/{w['parallel']:<4} "
            f"{w['waiting']:>7} {w['pending']:>7} {kv:>16}\n"
        )
