"""Per-tenant load shedding on the router: a token-bucket rate limit and a cap on requests in flight.

Shuffle sharding bounds *which* workers a flooding tenant can reach; quotas bound *how much*
of them it gets, and refuse the excess at the router, before any worker spends time on it.
A refused request costs the router microseconds and gets RESOURCE_EXHAUSTED with a retry hint
(`retry-after-ms` trailing metadata and in the message): when the bucket will hold a token
again, or a short pause for the in-flight cap.

Limits come from the tenant's route in etcd (`rate_limit`, `burst`, `max_inflight`; set with
`Registry.set_limits`), else the router's defaults (--tenant-rate-limit, --tenant-burst,
--tenant-max-inflight). A burst left unset is one second's worth of the rate. 0 = no limit.
Limits are per router: with N routers behind a balancer a tenant gets up to N times them.

Invariants:
- a tenant's bucket holds at most `burst` tokens and each admitted request takes one, so over
  any window of t seconds at most burst + rate * t requests are admitted;
- `inflight[tenant]` counts admitted requests not yet released; an admission beyond
  `max_inflight` is refused before it takes a token; every `admit` that returns is paired with
  exactly one `release` (the servicer's finally);
- a bucket that has refilled completely is indistinguishable from a new one, so full buckets
  are dropped when the map grows (amortised O(1)): memory follows the tenants active lately.
Event loop only: no locks.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from router.counters import RouterCounters
from version_service.schema import RouteRecord
from worker.overload import RetryLater

INFLIGHT_RETRY_AFTER_MS = 20
SWEEP_MIN = 10_000


class _Bucket:
    __slots__ = ("tokens", "stamp", "rate", "burst")

    def __init__(self, tokens: float, stamp: float, rate: float, burst: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.rate = rate  # as of the last request: what the sweep refills with
        self.burst = burst


class TenantQuotas:
    def __init__(self, rate: float = 10_000.0, burst: float = 0.0, max_inflight: int = 1024,
                 counters: RouterCounters | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst or rate
        self.max_inflight = max_inflight
        self.counters = counters if counters is not None else RouterCounters()
        self.inflight: dict[str, int] = {}
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._sweep_at = SWEEP_MIN

    def limits(self, route: RouteRecord) -> tuple[float, float, int]:
        """(rate, burst, max_inflight) for the route: its own, else this router's defaults."""
        if route.rate_limit is None:
            rate, burst = self.rate, route.burst if route.burst is not None else self.burst
        else:
            rate, burst = route.rate_limit, route.burst if route.burst is not None else route.rate_limit
        max_inflight = self.max_inflight if route.max_inflight is None else route.max_inflight
        return rate, max(1.0, burst), max_inflight

    def admit(self, tenant: str, route: RouteRecord) -> None:
        """Takes one request of `tenant` in, or raises RetryLater (RESOURCE_EXHAUSTED)."""
        rate, burst, max_inflight = self.limits(route)
        inflight = self.inflight.get(tenant, 0)
        if max_inflight and inflight >= max_inflight:
            self.counters.shed_inflight += 1
            raise RetryLater(f"tenant {tenant!r} has {inflight} requests in flight on this router, its limit",
                             INFLIGHT_RETRY_AFTER_MS)
        if rate > 0:
            now = self._clock()
            bucket = self._buckets.get(tenant)
            if bucket is None:
                if len(self._buckets) >= self._sweep_at:
                    self._sweep(now)
                bucket = self._buckets[tenant] = _Bucket(burst, now, rate, burst)
            else:
                bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
                bucket.stamp, bucket.rate, bucket.burst = now, rate, burst
            if bucket.tokens < 1.0:
                self.counters.shed_rate += 1
                wait_ms = math.ceil((1.0 - bucket.tokens) / rate * 1000)
                raise RetryLater(f"tenant {tenant!r} is over its rate limit of {rate:g} requests/s "
                                 f"(burst {burst:g}) on this router", wait_ms)
            bucket.tokens -= 1.0
        self.inflight[tenant] = inflight + 1

    def release(self, tenant: str) -> None:
        left = self.inflight[tenant] - 1
        if left:
            self.inflight[tenant] = left
        else:
            del self.inflight[tenant]

    def _sweep(self, now: float) -> None:
        """Drops buckets that are full again (they would be recreated full); amortised O(1)."""
        self._buckets = {t: b for t, b in self._buckets.items()
                         if b.tokens + (now - b.stamp) * b.rate < b.burst}
        self._sweep_at = max(SWEEP_MIN, 2 * len(self._buckets))
