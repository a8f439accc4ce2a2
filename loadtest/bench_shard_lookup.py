"""Shard lookup costs: the router's per-request path and the fleet-wide plan.

    python -m loadtest.bench_shard_lookup

Prints median and p99 per call for a ShardCache hit and a cold ``shard_for`` (16 and 64
workers), and wall time of ``fleet_shards`` for 100k tenants x 64 workers (plain and three
zones). Per-call times are single calls timed with ``perf_counter_ns`` and include the
clock's own overhead, printed first. Runs in well under 30 s.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from loadtest.cli import describe_only
from sharding import Member, ShardCache, fleet_shards, shard_for

K = 3


def _members(n: int, zones: int = 1) -> list[Member]:
    names = "abcdefgh"
    return [Member(f"worker-{i:03d}", f"zone-{names[i % zones]}") for i in range(n)]


def _per_call(fn: Callable[[str], object], tenants: list[str]) -> tuple[float, float]:
    clock = time.perf_counter_ns
    samples = []
    for t in tenants:
        t0 = clock()
        fn(t)
        samples.append(clock() - t0)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def _row(label: str, median_ns: float, p99_ns: float) -> None:
    print(f"  {label:<44} median {median_ns:>9,.0f} ns   p99 {p99_ns:>9,.0f} ns")


def main() -> None:
    describe_only(__doc__)
    print(f"python {platform.python_version()}, numpy {np.__version__}, os.cpu_count()={os.cpu_count()}")
    print("per call (k=3):")
    clock = time.perf_counter_ns
    _row("timer + call overhead (no-op lambda)", *_per_call(lambda _t: clock(), ["x"] * 100_000))

    tenants = [f"tenant-{i}" for i in range(20_000)]
    for n, zones in ((16, 1), (64, 3)):
        cache = ShardCache(_members(n, zones))
        for t in tenants:
            cache.get(t, K)
        get = cache.get
        _row(f"ShardCache.get hit   N={n}, zones={zones}", *_per_call(lambda t: get(t, K), tenants * 5))

    cold = [f"cold-{i}" for i in range(5_000)]
    for n in (16, 64):
        for zones in (1, 3):
            members = _members(n, zones)
            _row(f"shard_for cold       N={n}, zones={zones}", *_per_call(lambda t: shard_for(t, members, K), cold))
            cache = ShardCache(members)
            _row(f"ShardCache.get miss  N={n}, zones={zones}", *_per_call(lambda t: cache.get(t, K), cold))

    print("fleet_shards, 100,000 tenants x 64 workers (best / median of 5):")
    fleet_tenants = [f"tenant-{i}" for i in range(100_000)]
    mixed_k = np.random.default_rng(0).integers(1, 6, size=len(fleet_tenants))
    for label, members, k in (
        ("plain,   k=2", _members(64, 1), 2),
        ("plain,   k=3", _members(64, 1), 3),
        ("3 zones, k=3", _members(64, 3), 3),
        ("3 zones, k=1..5 per tenant", _members(64, 3), mixed_k),
        ("3 zones, k=64 (full order)", _members(64, 3), 64),
    ):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fleet_shards(fleet_tenants, members, k)
            times.append(time.perf_counter() - t0)
        print(f"  {label:<44} {min(times) * 1e3:>7.1f} ms / {statistics.median(times) * 1e3:>7.1f} ms")


if __name__ == "__main__":
    main()
