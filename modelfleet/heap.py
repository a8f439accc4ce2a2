"""Keeping the cyclic garbage collector's full collections off the request path's tail.

A router holds every tenant's route record, a worker its models' bookkeeping, and both the
modules, servers and channels they started with. A full (generation 2) collection walks every
one of those objects, and a request that arrives during one waits it out: in a router holding
100k tenants a full collection takes ~27-37 ms (`python -m loadtest.bench_gc_pause`, 2 cores),
and under load up to 55 ms in a live router and 26 ms in a worker (timed with `gc.callbacks`
during `python -m loadtest.bench` cells). Those objects are made at start and live as long as
the process, so once it is ready they are moved out of the collector's sight (`gc.freeze`):
full collections then walk only what was made since (at most 1 ms in that router, 4.5 ms in that
worker). Frozen objects are still freed by reference counting when dropped; only one caught in
a reference cycle would never be collected.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collects what start-up left behind, then freezes the rest; returns how many objects the
    collector will no longer walk (logged with the process's `serving` event).

    A young-generation collection: start-up's garbage is young (the automatic collections during
    the imports took the rest). After a worker's and a router's imports it found the same 5
    objects a full collection did, in ~1 ms instead of ~40 ms, which every start paid (~250 in
    the tests)."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()
