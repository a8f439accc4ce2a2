"""Canary choice and shadow traffic for tenants in a rollout; counters for `rollout --status`.

Canary: a request with routing key `x-modelfleet-key` goes to the canary iff a hash of
(tenant, key) falls in the canary's percent, so one key always sees one version; without a key
the choice is random. Shadow: after the caller has its answer, a copy goes to the shadow
version on the shard's first member (router.failover's send_shadow: never failed over, hedged or
held against the worker, since a slow shadow must not eject a worker nor load on every member), at
most `budget` at a time per router (a full budget, or an ejected first member, drops the copy and
counts it);
its latency, errors and difference from the served answer are recorded, never returned.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc
import xxhash

from modelfleet.v1 import predictor_pb2
from version_service.schema import CANARY_BUCKETS, canary_buckets

ROUTING_KEY = "x-modelfleet-key"
LATENCY_SAMPLE = 1000
FORGET_EVERY_S = 60.0  # how often the stats of ended rollouts are dropped


def routing_key(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == ROUTING_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def in_canary(tenant: str, percent: float, key: str | None) -> bool:
    """Keyed and unkeyed requests alike: `canary_buckets(percent)` of CANARY_BUCKETS (a whole number,
    so both shares are the same, and a canary that grows keeps the keys it had)."""
    buckets = canary_buckets(percent)
    if key is None:
        return random.random() * CANARY_BUCKETS < buckets
    return xxhash.xxh3_64_intdigest(f"{tenant}\x00{key}".encode()) % CANARY_BUCKETS < buckets


ROLLOUT_FIELDS = ("canary", "canary_percent", "shadow", "rollout_id")  # a rollout; rollout_of adds `serving`


def rollout_of(route) -> tuple:
    """What identifies one rollout of a route: a rollout started anew (even of the same version at
    the same percentage, after an abort) is another, and its counts start from zero. So is one whose
    serving version changed under it (a register of a newer version, a pin): its canary and shadow
    are then compared with another version, and the old figures would be mixed into the new."""
    return route.canary, route.canary_percent, route.shadow, route.rollout_id, route.serving


@dataclass
class RolloutStats:
    """One tenant's rollout as this router saw it (reset when the rollout changes: `rollout_of`)."""

    rollout: tuple[str | None, float | None, str | None, str | None, str]
    serving_requests: int = 0
    canary_requests: int = 0
    serving_errors: int = 0  # of those, failed: a canary that fails its traffic must show
    canary_errors: int = 0
    shadow_requests: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    diff_sum: float = 0.0
    diff_max: float = 0.0
    diff_count: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLE))


class Rollouts:
    """Each tenant's RolloutStats while its rollout lasts. `route_of` (the routing cache's lookup):
    every `forget_every_s`, from `start()`, the stats of rollouts that have ended are dropped;
    nothing reads them (RouterAdmin answers only the route's current rollout), and a shadow's
    latency sample is ~32 KiB: kept for every tenant ever shadowed, a router serving 100k tenants
    would have grown by gigabytes. A sweep on a timer, not on the next rollout's start: a router
    whose last rollout has ended would otherwise keep its stats until another begins."""

    def __init__(self, shadow_budget: int = 16, route_of: Callable[[str], object | None] | None = None,
                 forget_every_s: float = FORGET_EVERY_S) -> None:
        self.stats: dict[str, RolloutStats] = {}
        self._budget = asyncio.Semaphore(shadow_budget)
        self._tasks: set[asyncio.Task] = set()
        self._route_of = route_of
        self._forget_every_s = forget_every_s
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the sweep of ended rollouts' stats (needs the running loop; `close` stops it)."""
        if self._route_of is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def stats_for(self, tenant: str, route) -> RolloutStats:
        rollout = rollout_of(route)
        stats = self.stats.get(tenant)
        if stats is None or stats.rollout != rollout:
            stats = self.stats[tenant] = RolloutStats(rollout)
        return stats

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._forget_every_s)  # a period, not a wait for something
            self.forget_ended()

    def forget_ended(self) -> None:
        """Drops the stats of every tenant whose route no longer has the rollout they count."""
        for tenant, stats in list(self.stats.items()):
            route = self._route_of(tenant)
            if route is None or rollout_of(route) != stats.rollout:
                del self.stats[tenant]

    def shadow(self, stats: RolloutStats, request: predictor_pb2.PredictRequest,
               served: predictor_pb2.PredictResponse,
               send: Callable[[predictor_pb2.PredictRequest],
                             Awaitable[predictor_pb2.PredictResponse | None]]) -> None:
        """Fire-and-forget a copy of `request` to the shadow version (never blocks the caller)."""
        if self._budget.locked():
            stats.shadow_dropped += 1
            return
        copy = predictor_pb2.PredictRequest()
        copy.CopyFrom(request)
        copy.version = stats.rollout[2]
        task = asyncio.get_running_loop().create_task(self._run_shadow(stats, copy, list(served.predictions), send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_shadow(self, stats, request, served, send) -> None:
        async with self._budget:
            started = time.perf_counter()
            try:
                response = await send(request)
            except Exception:  # noqa: BLE001 - any failure of the shadow is a statistic, not an error
                stats.shadow_requests += 1
                stats.shadow_errors += 1
                return
            if response is None:  # its member is ejected or gone: not sent (Failover.send_shadow)
                stats.shadow_dropped += 1
                return
            stats.shadow_requests += 1
            stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            if len(response.predictions) != len(served):
                stats.shadow_errors += 1
                return
            for a, b in zip(served, response.predictions):
                diff = abs(a - b)
                stats.diff_sum += diff
                stats.diff_count += 1
                stats.diff_max = max(stats.diff_max, diff)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
