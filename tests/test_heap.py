"""The start-up heap leaves the garbage collector's full collections (modelfleet.heap): checked in
a router-sized heap built the way a router builds it (a real etcd, a real RoutingCache)."""
from __future__ import annotations

from loadtest import bench_gc_pause


def test_freezing_takes_a_router_heap_out_of_full_collections():
    got = bench_gc_pause.measure(tenants=3000, rounds=2)
    assert got["routes"] == 3000
    assert got["frozen"] > 0.5 * got["walked_before"]  # most of what a full collection walked ...
    assert got["walked_after"] < 0.1 * got["walked_before"]  # ... it no longer walks
