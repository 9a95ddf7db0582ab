"""The sizes of one `llamaq bench` run: the defaults of a full run, --quick's smoke sizes, then explicit flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Plan:
    """Sizes of every section; --quick shrinks them all to a smoke run."""

    clients: tuple[int, ...]
    max_tokens: int
    requests_per_client: int
    rounds: int = 2
    """Closed-loop rounds per client count; the systems' order is reversed every other round."""
    limit_sizes: tuple[int, ...] = (1, 16, 64)
    limit_tokens: int = 64
    limit_rounds: int = 2
    serve_rates: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    serve_window_s: float = 60.0
    """Seconds of Poisson arrivals per rate (at least serve_min_requests requests)."""
    serve_min_requests: int = 30
    serve_parallel: int = 16
    serve_beyond: int = 1
    """Rates still run after a system saturated (to show the knee), then its sweep stops."""
    serve_max_tokens: int | None = None
    """A cap on the set's max_tokens (a smoke run's requests stay short); None keeps the set's."""
    thread_counts: tuple[int, ...] = (1, 2)
    thread_clients: tuple[int, ...] = (1, 16)
    budgets: tuple[int, ...] = (64, 128, 256, 512)
    budget_rate: float = 1.5
    budget_requests: int = 90
    round_trip_clients: tuple[int, ...] = (1, 16, 64)
    turns: int = 10
    turn_repeats: int = 3
    turn_tokens: int = 32
    shared_chats: int = 16
    shared_system_repeats: int = 16
    shared_tokens: int = 16
    overhead_sizes: tuple[int, ...] = (16, 64)
    """Sequences decoding at once in the overhead section (issue 18 asks for the per-step work at 64)."""
    overhead_tokens: int = 128
    pressure_requests: int = 256
    pressure_processes: int = 8
    pressure_parallel: int = 16


QUICK = {
    "rounds": 1,
    "limit_sizes": (1, 4),
    "limit_tokens": 8,
    "limit_rounds": 1,
    "serve_rates": (2.0,),
    "serve_window_s": 2.0,
    "serve_min_requests": 6,
    "serve_parallel": 4,
    "serve_beyond": 0,
    "serve_max_tokens": 8,
    "thread_counts": (1, 2),
    "thread_clients": (1,),
    "budgets": (64, 512),
    "budget_rate": 2.0,
    "budget_requests": 6,
    "round_trip_clients": (4,),
    "turns": 3,
    "turn_repeats": 1,
    "turn_tokens": 8,
    "shared_chats": 4,
    "shared_system_repeats": 4,
    "shared_tokens": 4,
    "overhead_sizes": (4,),
    "overhead_tokens": 16,
    "pressure_requests": 32,
    "pressure_processes": 4,
    "pressure_parallel": 4,
}


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The sizes of this run: the defaults or --quick's, then any explicit flag."""
    quick = args.quick
    clients = _ints(args.clients or ("1,4" if quick else "1,4,8,16,32,64"))
    plan = Plan(
        clients=clients,
        max_tokens=args.max_tokens or (8 if quick else 64),
        requests_per_client=args.requests_per_client or (1 if quick else 2),
    )
    if quick:
        plan = replace(plan, **QUICK)  # type: ignore[arg-type]
    overrides: dict[str, object] = {}
    if args.rounds:
        overrides["rounds"] = overrides["limit_rounds"] = args.rounds
    if args.limit_sizes:
        overrides["limit_sizes"] = _ints(args.limit_sizes)
    if args.rates:
        overrides["serve_rates"] = tuple(float(r) for r in args.rates.split(","))
    if args.serve_window:
        overrides["serve_window_s"] = args.serve_window
    return replace(plan, **overrides)  # type: ignore[arg-type]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())
