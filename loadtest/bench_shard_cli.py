"""`shards report` and `shards plan` against a live etcd holding 100k tenants and 64 workers.

Times the real commands (process start, one ranged read of every route, the vectorised shard
computation, output) the way an operator runs them.

    python -m loadtest.bench_shard_cli [--tenants 100000] [--workers 64] [--zones 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modelfleet import processes
from modelfleet.etcd_server import EtcdServer
from version_service.etcd_client import MAX_TXN_OPS, connect
from version_service.schema import Keys, RouteRecord, WorkerRecord


def populate(endpoint: str, keys: Keys, tenants: int, workers: int, zones: int) -> None:
    client = connect(endpoint, timeout=30)
    txn = client.transactions
    route = RouteRecord(serving="v1", newest="v1").to_json()
    ops = [txn.put(keys.route(f"tenant-{i:06d}"), route) for i in range(tenants)]
    ops += [txn.put(keys.worker(f"worker-{i:02d}"),
                    WorkerRecord(f"worker-{i:02d}", f"127.0.0.1:{20000 + i}", zone=f"zone-{'abcdefgh'[i % zones]}")
                    .to_json()) for i in range(workers)]
    for start in range(0, len(ops), MAX_TXN_OPS):
        client.transaction(compare=[], success=ops[start:start + MAX_TXN_OPS], failure=[])
    client.close()


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "modelfleet.cli", *argv], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed: {done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--zones", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modelfleet-bench-shard-cli-"))
    etcd = EtcdServer(data_dir=root / "etcd").start()
    try:
        prefix = f"/bench/{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        populate(etcd.endpoint, Keys(prefix), args.tenants, args.workers, args.zones)
        populate_s = time.perf_counter() - started
        env = dict(os.environ, MODELFLEET_ETCD=etcd.endpoint, MODELFLEET_PREFIX=prefix)
        rows = [
            ("shards report --json (live)", timed(["shards", "report", "--json"], env)),
            ("shards plan --drain worker-07 --json", timed(["shards", "plan", "--drain", "worker-07", "--json"], env)),
            ("shards plan --add-worker new@zone-a --json",
             timed(["shards", "plan", "--add-worker", "new@zone-a", "--json"], env)),
            ("shards plan (rich table)", timed(["shards", "plan", "--remove-worker", "worker-03"], env)),
            (f"shards report --simulate-workers {args.workers} --tenants {args.tenants} --json",
             timed(["shards", "report", "--simulate-workers", str(args.workers), "--tenants", str(args.tenants),
                    "--zones", str(args.zones), "--json"], env)),
        ]
    finally:
        etcd.cleanup()
        shutil.rmtree(root, ignore_errors=True)  # etcd's data
    table = Table(title=f"{args.tenants} tenants x {args.workers} workers, {args.zones} zones, "
                        f"{os.cpu_count()} cores (etcd populated in {populate_s:.1f} s)")
    table.add_column("command (wall time, process start included)")
    table.add_column("seconds", justify="right")
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
