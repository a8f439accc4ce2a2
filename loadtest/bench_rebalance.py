"""Make-before-break, measured: cold loads and p99 while a worker joins a fleet under load.

One run, both variants side by side: a 4th worker joins a 3-worker fleet (k=2) while a load
generator (its own process) keeps every tenant active; with --warm-on-join the newcomer loads
the active tenants it is about to own before it goes live, without it pays for them under
traffic. Prints cold loads on the newcomer after it went live, and p50/p99 latency in the two
seconds after the join against the steady state before it.

    python -m loadtest.bench_rebalance [--tenants 120] [--before 3] [--after 4]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from modelfleet import processes
from modelfleet.demo_models import sample_features
from modelfleet.etcd_server import EtcdServer
from modelfleet.local_fleet import LocalFleet


def generate_load(router: str, tenants: list[str], seconds: float, threads: int, out) -> None:
    """Runs in its own process: uniform traffic over all tenants; sends back (t, latency, ok)."""
    import threading

    import grpc

    from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc

    stub = predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(router))
    x = sample_features(1, 1)[0].tolist()
    records: list[tuple[float, float, bool]] = []
    stop = time.monotonic() + seconds

    def loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            tenant = tenants[int(rng.integers(len(tenants)))]
            started = time.monotonic()
            try:
                stub.Predict(predictor_pb2.PredictRequest(tenant_id=tenant, features=x), timeout=10)
                ok = True
            except grpc.RpcError:
                ok = False
            records.append((started, time.monotonic() - started, ok))

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.send(records)


def _percentile_ms(window: np.ndarray, q: float) -> float:
    """NaN for a window with no requests (the join outlasted --after) rather than a crash."""
    return float(np.percentile(window[:, 1], q) * 1000) if len(window) else float("nan")


def run_variant(etcd: EtcdServer, root: Path, warm: bool, args: argparse.Namespace) -> dict:
    fleet = LocalFleet(etcd.endpoint, f"/bench/{uuid.uuid4().hex[:8]}", root)
    try:
        tenants = [f"t{i:04d}" for i in range(args.tenants)]
        for i, tenant in enumerate(tenants):
            fleet.register(tenant, "v1", seed=i % 8, num_trees=200, num_leaves=31)  # a few ms to load each
        flag = ("--warm-on-join", "1" if warm else "0")
        fleet.start_workers([(f"w{i}", "default") for i in range(1, 4)], extra=flag)
        router = fleet.start_router(shard_size=2)
        receiver, sender = mp.Pipe(duplex=False)
        load = mp.get_context("spawn").Process(target=generate_load, args=(router.address, tenants,
                                                                          args.before + args.after, 8, sender))
        load.start()
        time.sleep(args.before)  # steady state: every tenant active and warm on its first member
        joined_at = time.monotonic()
        newcomer = fleet.start_worker("w4", extra=flag)
        live_at = time.monotonic()
        from tests.fleet import stats  # noqa: PLC0415 - same helper the tests use

        loads_at_live = stats(newcomer.address).loads_total
        records = receiver.recv()
        load.join(30)
        final = stats(newcomer.address).loads_total
        lat = np.array([(t, l, ok) for t, l, ok in records])
        steady = lat[(lat[:, 0] < joined_at) & (lat[:, 0] > joined_at - args.before + 1)]
        after = lat[(lat[:, 0] >= live_at) & (lat[:, 0] < live_at + 2)]
        return {
            "variant": "make-before-break" if warm else "cold join",
            "warm_loads": loads_at_live,
            "cold_loads_under_traffic": final - loads_at_live,
            "join_s": live_at - joined_at,
            "steady_p50_ms": _percentile_ms(steady, 50),
            "steady_p99_ms": _percentile_ms(steady, 99),
            "after_p50_ms": _percentile_ms(after, 50),
            "after_p99_ms": _percentile_ms(after, 99),
            "failed": int((lat[:, 2] == 0).sum()),
            "requests": len(lat),
        }
    finally:
        fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=120)
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the join")
    parser.add_argument("--after", type=float, default=4.0, help="seconds of load after the join starts")
    args = parser.parse_args()
    if args.before <= 1:  # the steady window leaves out the load's first second (warm-up)
        parser.error("--before must be more than 1 second")
    if args.after <= 0:
        parser.error("--after must be positive")
    root = Path(tempfile.mkdtemp(prefix="modelfleet-bench-rebalance-"))
    etcd = EtcdServer(data_dir=root / "etcd").start()
    try:
        rows = [run_variant(etcd, root / name, warm, args) for name, warm in (("cold", False), ("warm", True))]
    finally:
        etcd.cleanup()
        shutil.rmtree(root, ignore_errors=True)  # etcd's data and both variants' fleets
    table = Table(title=f"a 4th worker joins 3 under load ({args.tenants} tenants, k=2, {os.cpu_count()} cores)")
    for column in ("variant", "loads before live", "cold loads under traffic", "join s", "steady p50/p99 ms",
                   "2 s after join p50/p99 ms", "failed/requests"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["variant"], str(r["warm_loads"]), str(r["cold_loads_under_traffic"]), f"{r['join_s']:.2f}",
                      f"{r['steady_p50_ms']:.1f} / {r['steady_p99_ms']:.1f}",
                      f"{r['after_p50_ms']:.1f} / {r['after_p99_ms']:.1f}", f"{r['failed']}/{r['requests']}")
    Console(width=160).print(table)


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
