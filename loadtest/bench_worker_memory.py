"""A worker's memory under a thrash, and what a cold miss adds to a request.

    python -m loadtest.bench_worker_memory [--models 20000] [--budget 64MiB] [--cold 200] [--rounds 1]
        [--no-hints] [--compare-env NAME=VALUE ...]

1. Thrash: one real worker with a byte budget much smaller than the fleet; every request is a
   different tenant's model (a synthetic fleet: distinct models, imported through the real
   pipeline), so every request loads and, once the budget is full, evicts. RSS is sampled as it
   goes: it must stay within budget + the worker's baseline, and stop growing (no leak).
   Requests carry the artifact hint a router sends (worker.artifact_hint), so the worker reads
   no version records; --no-hints makes it read (and cache) one per tenant, as for callers
   that send none.
   With --compare-env, a second worker runs beside the first with those environment variables
   added (e.g. glibc's GLIBC_TUNABLES or MALLOC_ARENA_MAX_), and every request goes to both in
   alternating order, so a malloc setting is compared within one run on the same machine load.
2. Cold miss: for tenants never loaded, the latency of the first request against the second,
   beside the time LightGBM needs to parse the same artifact in this process.
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

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from modelfleet import processes
from modelfleet.config import byte_size
from modelfleet.demo_models import sample_features
from modelfleet.etcd_server import EtcdServer
from modelfleet.fleet_gen import generate_fleet
from modelfleet.local_fleet import LocalFleet
from modelfleet.procfs import rss_bytes
from modelfleet.v1 import predictor_pb2, worker_pb2, worker_pb2_grpc
from version_service.schema import RouteRecord
from worker.predictor import LoadedModel


def rss_mb(pid: int) -> float:
    rss = rss_bytes([pid])
    return float("nan") if rss is None else rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20_000)
    parser.add_argument("--budget", default="64MiB")
    parser.add_argument("--cold", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="passes over all models (100k cycles: 5 x 20k)")
    parser.add_argument("--hints", action=argparse.BooleanOptionalAction, default=True,
                        help="send each request's artifact digest, as routers do (default: on)")
    parser.add_argument("--compare-env", action="append", default=[], metavar="NAME=VALUE",
                        help="start a second worker with this added to its environment (repeatable)")
    args = parser.parse_args()
    budget = byte_size(args.budget)
    root = Path(tempfile.mkdtemp(prefix="modelfleet-bench-memory-"))
    etcd = EtcdServer(data_dir=root / "etcd").start()
    fleet = LocalFleet(etcd.endpoint, f"/bench/{uuid.uuid4().hex[:8]}", root / "fleet")
    console = Console(width=130)
    try:
        started = time.monotonic()
        manifest = generate_fleet(root / "synthetic", args.models + args.cold)
        done = subprocess.run([sys.executable, "-m", "modelfleet.cli", "import", str(manifest), "--json"],
                              env=fleet.env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        console.print(f"fleet of {args.models + args.cold} distinct models generated and imported in "
                      f"{time.monotonic() - started:.0f} s")
        workers = {"w1": fleet.start_worker("w1", cache_bytes=budget)}
        if args.compare_env:
            added = dict(item.split("=", 1) for item in args.compare_env)
            saved = dict(os.environ)
            os.environ.update(added)  # LocalFleet.spawn passes os.environ on
            try:
                workers["w2"] = fleet.start_worker("w2", cache_bytes=budget)
            finally:
                os.environ.clear()
                os.environ.update(saved)
        labels = {"w1": "w1 (as configured)", "w2": f"w2 (+ {' '.join(args.compare_env)})"}
        stubs = {name: worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address)) for name, w in workers.items()}
        order = list(stubs.values())
        stub = stubs["w1"]
        x = sample_features(1, 1)[0].tolist()
        tenants = [f"tenant-{i:06d}" for i in range(1, args.models + 1)]
        hints = {}
        if args.hints:  # what a router knows from the routes it watches
            for raw, meta in fleet.client.get_prefix(fleet.keys.routes):
                hints[fleet.keys.tenant_of_route(meta.key.decode())] = RouteRecord.from_json(raw).serving_sha256
        baseline = {name: rss_mb(w.popen.pid) for name, w in workers.items()}
        samples: list[tuple[int, dict[str, float]]] = []
        total = args.models * args.rounds
        started = time.monotonic()
        for n in range(total):
            tenant = tenants[n % args.models]
            request = predictor_pb2.PredictRequest(tenant_id=tenant, version="v1", features=x,
                                                   artifact_sha256=hints.get(tenant) or "")
            for each in (order if n % 2 == 0 else order[::-1]):  # neither worker always goes first
                each.Predict(request, timeout=30)
            if n % max(1, total // 20) == 0 or n == total - 1:
                samples.append((n + 1, {name: rss_mb(w.popen.pid) for name, w in workers.items()}))
        elapsed = time.monotonic() - started
        stats = {name: each.Stats(worker_pb2.StatsRequest(), timeout=5) for name, each in stubs.items()}

        cold, warm = [], []
        for i in range(args.models + 1, args.models + args.cold + 1):
            tenant = f"tenant-{i:06d}"
            request = predictor_pb2.PredictRequest(tenant_id=tenant, version="v1", features=x,
                                                   artifact_sha256=hints.get(tenant) or "")
            for bucket in (cold, warm):
                t0 = time.perf_counter()
                stub.Predict(request, timeout=30)
                bucket.append((time.perf_counter() - t0) * 1000)
        texts = [p.read_text() for p in sorted((root / "synthetic" / "models").rglob("*.txt"))[:args.cold]]
        parse = []
        for text in texts:
            t0 = time.perf_counter()
            LoadedModel.from_model_text(text).close()
            parse.append((time.perf_counter() - t0) * 1000)
    finally:
        fleet.stop()
        etcd.cleanup()
        shutil.rmtree(root, ignore_errors=True)  # the synthetic fleet: ~1.5 GB at 20k models

    table = Table(title=f"worker RSS MB over {total} loads of {args.models} distinct models, budget {args.budget} "
                        f"({os.cpu_count()} cores; {total * len(workers) / elapsed:.0f} loads/s; "
                        f"{'with' if args.hints else 'without'} artifact hints)")
    table.add_column("requests")
    for name in workers:
        table.add_column(labels[name], justify="right")
    for n, mbs in samples:
        table.add_row(str(n), *(f"{mbs[name]:.0f}" for name in workers))
    console.print(table)
    for name in workers:
        series = [mbs[name] for _, mbs in samples]
        tail = series[len(series) // 2:]
        st = stats[name]
        target = baseline[name] + budget / 2**20
        console.print(f"{labels[name]}: empty RSS {baseline[name]:.0f} MB + budget {budget / 2**20:.0f} MB = "
                      f"{target:.0f} MB; second-half RSS median {np.median(tail):.0f} MB, max {max(series):.0f} MB "
                      f"(over budget + empty: {max(series) - target:+.0f} MB); second-half growth "
                      f"{tail[-1] - tail[0]:+.0f} MB; loads {st.loads_total}, evictions {st.evictions_total}, "
                      f"cache bytes {st.bytes_used / 2**20:.1f} MB")
    added = np.median(cold) - np.median(warm)
    console.print(f"cold miss over {args.cold} tenants (w1): first request p50 {np.median(cold):.2f} ms, second "
                  f"{np.median(warm):.2f} ms, added {added:.2f} ms; parse alone p50 {np.median(parse):.2f} ms "
                  f"-> added - parse = {added - np.median(parse):.2f} ms (target <= 2 ms)")


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
