"""What the router's failover and load shedding did: plain integers, bumped on the event loop.

One instance per router, shared by failover, ejection and quotas; read by admin views, tests
and (later) metrics. Only the event loop thread writes, so no locks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RouterCounters:
    attempts: int = 0  # calls sent to workers (first tries, retries and hedges)
    retries: int = 0  # attempts on a further member after a failure or an attempt timeout
    attempt_timeouts: int = 0  # attempts that passed their share of the deadline with time left
    hedges: int = 0  # hedged attempts sent
    hedge_wins: int = 0  # requests answered by a hedge
    ejections: int = 0  # times a worker was ejected (or re-ejected after a failed probe)
    probes: int = 0  # requests let through to an ejected worker to test it
    restored: int = 0  # ejected workers back in after a success
    shed_rate: int = 0  # requests refused: tenant over its rate limit
    shed_inflight: int = 0  # requests refused: tenant at its in-flight limit

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
