"""What a full garbage collection costs a router holding 100k tenants, with and without the
start-up heap frozen (`modelfleet.heap.freeze_startup_heap`, which routers and workers call
once they are ready).

    python -m loadtest.bench_gc_pause [--tenants 100000] [--rounds 7]

A real etcd gets N tenants' route and version records (the benchmark fleet's bulk path); a real
RoutingCache loads them, as a router does at start, beside a ShardCache holding every tenant's
shard. Then full collections (`gc.collect()`) are timed, before and after the freeze, in one
process, side by side. A request that arrives during a full collection waits it out, so this is
a floor under the router's p99 whenever one runs.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadtest.bench import Artifact, register_bulk, tenant_name
from modelfleet import heap, processes
from modelfleet.demo_models import train_model_text
from modelfleet.etcd_server import EtcdServer
from modelfleet.store import LocalStore
from sharding import Member, ShardCache
from version_service.etcd_client import connect
from version_service.routing_cache import RoutingCache
from version_service.schema import Keys


def full_collections_ms(rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def measure(tenants: int, rounds: int) -> dict:
    """Full-collection times (ms) and objects walked, before and after the freeze."""
    with tempfile.TemporaryDirectory(prefix="modelfleet-gc-") as tmp:
        root = Path(tmp)
        etcd = EtcdServer(data_dir=root / "etcd", log_path=root / "etcd.log").start()
        try:
            keys = Keys(f"/gc/{uuid.uuid4().hex[:8]}")
            model = root / "model.txt"
            model.write_text(train_model_text(seed=1))  # every tenant's record names this artifact
            stored = LocalStore(root / "store").put_file(model)
            artifacts = [Artifact(stored.artifact, stored.sha256, stored.size, 8, 1, "regression", model, 0)]
            client = connect(etcd.endpoint)
            names = [tenant_name("zipf", i) for i in range(tenants)]
            register_bulk(client, keys, names, artifacts)
            client.close()

            routes = RoutingCache(etcd.endpoint, keys)
            routes.start()
            shards = ShardCache([Member(f"worker-{i:02d}", "default") for i in range(16)])
            for name in names:
                shards.get(name, 2)
            try:
                walked_before = len(gc.get_objects())
                before = full_collections_ms(rounds)
                frozen = heap.freeze_startup_heap()
                after = full_collections_ms(rounds)
                walked_after = len(gc.get_objects())
            finally:
                routes.stop()
                gc.unfreeze()  # back to how this process was (a test calls this in its own process)
        finally:
            etcd.cleanup()
    return {"routes": len(routes.routes), "frozen": frozen, "walked_before": walked_before, "before_ms": before,
            "walked_after": walked_after, "after_ms": after}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_gc_pause", description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    got = measure(args.tenants, args.rounds)
    table = Table(title=f"Full collections, {got['routes']:,} routes, {os.cpu_count()} cores")
    for column in ("heap", "objects walked", "p50 ms", "max ms"):
        table.add_column(column, justify="left" if column == "heap" else "right")
    table.add_row("as started", f"{got['walked_before']:,}", f"{statistics.median(got['before_ms']):.1f}",
                  f"{max(got['before_ms']):.1f}")
    table.add_row(f"frozen ({got['frozen']:,})", f"{got['walked_after']:,}",
                  f"{statistics.median(got['after_ms']):.2f}", f"{max(got['after_ms']):.2f}")
    Console().print(table)


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
