"""Hit ratios of the worker's cache policy against a plain LRU, on the benchmark's tenant mixes.

    python -m loadtest.bench_cache_policy [--requests 400000] [--cache-models 1000]

Replays one Zipf(s=1.1) stream of tenants (loadtest.bench's own draw, so the same mixes)
through worker.tinylfu_cache.TinyLfuCache (the worker's policy, the real class, every model one
unit of bytes) and through a cachetools LRUCache of the same capacity (the naive server's), side
by side. Prints each one's miss ratio over the whole stream and over its second half (warm), the
ideal (the capacity's hottest tenants always held) and the per-request cost of the policy's own
bookkeeping. A miss is a model load (~1.3-3 ms of CPU for the benchmark's models), so the
misses saved are what the policy buys. Then what it costs: a switch of the whole hot set, where
an LRU adapts at once and W-TinyLFU must first forget; and what that memory is for: a scan of
one-off tenants beside the usual traffic. No servers; runs in ~15 s.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from cachetools import LRUCache

from loadtest.bench import MIX_TENANTS, ZIPF_S, tenant_draws
from worker.tinylfu_cache import TinyLfuCache


def lru_misses(stream: list[int], capacity: int) -> np.ndarray:
    cache: LRUCache = LRUCache(maxsize=capacity)
    missed = np.zeros(len(stream), dtype=bool)
    for i, tenant in enumerate(stream):
        if cache.get(tenant) is None:
            missed[i] = True
            cache[tenant] = True
    return missed


def tinylfu_misses(stream: list[int], capacity: int) -> tuple[np.ndarray, float]:
    cache: TinyLfuCache[int, bool] = TinyLfuCache(capacity, sizeof=lambda _v: 1, on_evict=lambda _k, _v, _refused: None)
    missed = np.zeros(len(stream), dtype=bool)
    started = time.perf_counter()
    for i, tenant in enumerate(stream):
        if cache.get(tenant) is None:
            missed[i] = True
            cache.put(tenant, True)
    return missed, (time.perf_counter() - started) / len(stream)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400_000)
    parser.add_argument("--cache-models", type=int, default=1000)
    args = parser.parse_args(argv)
    print(f"os.cpu_count()={os.cpu_count()}, {args.requests:,} requests, room for {args.cache_models:,} models, "
          f"Zipf s={ZIPF_S}")
    print(f"{'mix':<10} {'policy':<10} {'miss %':>8} {'warm miss %':>12} {'misses saved':>13} {'µs/request':>11}")
    for mix in ("zipf10k", "zipf100k"):
        n = MIX_TENANTS[mix]
        stream = tenant_draws(mix, n, args.requests, seed=1).tolist()
        half = len(stream) // 2
        lru = lru_misses(stream, args.cache_models)
        tiny, per_request = tinylfu_misses(stream, args.cache_models)
        weights = np.arange(1, n + 1, dtype=np.float64) ** -ZIPF_S
        ideal = 1 - weights[:args.cache_models].sum() / weights.sum()
        for policy, missed, cost in (("lru", lru, ""), ("w-tinylfu", tiny, f"{per_request * 1e6:.2f}")):
            saved = 1 - missed.sum() / lru.sum()
            print(f"{mix:<10} {policy:<10} {100 * missed.mean():>8.1f} {100 * missed[half:].mean():>12.1f} "
                  f"{100 * saved:>12.0f}% {cost:>11}")
        print(f"{mix:<10} {'ideal':<10} {100 * ideal:>8.1f}")

    # The hot set changes at once, as between loadtest.bench's mixes on one worker: the sketch
    # still ranks the old tenants high until it has aged (W-TinyLFU's weak spot, LRU's strong one).
    before = [("old", t) for t in tenant_draws("zipf10k", MIX_TENANTS["zipf10k"], 8 * args.cache_models, seed=1)]
    after = [("new", t) for t in tenant_draws("zipf100k", MIX_TENANTS["zipf100k"], 60 * args.cache_models, seed=2)]
    stream = before + after
    lru, (tiny, _) = lru_misses(stream, args.cache_models), tinylfu_misses(stream, args.cache_models)
    switch, soon = len(before), len(before) + 4 * args.cache_models
    print(f"hot set switch (zipf10k for {len(before):,} requests, then zipf100k): miss % over the next "
          f"{soon - switch:,} requests / after those")
    for policy, missed in (("lru", lru), ("w-tinylfu", tiny)):
        print(f"{'':<10} {policy:<10} {100 * missed[switch:soon].mean():>8.1f} {100 * missed[soon:].mean():>12.1f}")

    # A scan: a batch job asks once for each of many tenants nobody else asks for, beside the
    # usual traffic. An LRU lets every one of them push a model out; W-TinyLFU keeps them out. A
    # policy that forgot its history whenever misses jump (to follow a hot set switch sooner)
    # would read a scan as a switch and lose this.
    usual = tenant_draws("zipf10k", MIX_TENANTS["zipf10k"], 60 * args.cache_models, seed=3).tolist()
    scan_from, scan_to = 20 * args.cache_models, 25 * args.cache_models
    stream, usual_at = [], []
    for i, tenant in enumerate(usual):
        usual_at.append(len(stream))
        stream.append(tenant)
        if scan_from <= i < scan_to:
            stream.append(("scan", i))
    lru, (tiny, _) = lru_misses(stream, args.cache_models), tinylfu_misses(stream, args.cache_models)
    print(f"scan ({scan_to - scan_from:,} one-off tenants, one after each zipf10k request): miss % of the "
          f"zipf10k requests during the scan / over the next {scan_to - scan_from:,}")
    for policy, missed in (("lru", lru), ("w-tinylfu", tiny)):
        usual_missed = missed[usual_at]
        print(f"{'':<10} {policy:<10} {100 * usual_missed[scan_from:scan_to].mean():>8.1f} "
              f"{100 * usual_missed[scan_to:2 * scan_to - scan_from].mean():>12.1f}")


if __name__ == "__main__":
    main()
