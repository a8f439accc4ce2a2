"""Version service at fleet scale: bulk import, router start and memory, pin propagation.

    python -m loadtest.bench_versions [--tenants 100000] [--pins 60]

1. `modelfleet import` of a manifest with N tenant versions (artifacts shared by a few model
   files, so the artifact phase is reported separately from registration).
2. A router started against those N routes: time from spawn to SERVING, and its RSS against a
   router on an empty fleet (the routing state's memory).
3. Propagation under load: a load generator process keeps requests flowing over many tenants
   while a probe hammers one tenant; each pin's etcd commit is timed to the first answer from
   the new version. p50/p99 over --pins pins.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from modelfleet import processes
from modelfleet.demo_models import sample_features
from modelfleet.etcd_server import EtcdServer
from modelfleet.local_fleet import LocalFleet
from modelfleet.procfs import rss_bytes
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc


def rss_mb(pid: int) -> float:
    rss = rss_bytes([pid])
    return float("nan") if rss is None else rss / 2**20


def background_load(router: str, tenants: list[str], seconds: float) -> None:
    stub = predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(router))
    x = sample_features(1, 1)[0].tolist()
    rng = np.random.default_rng(0)
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            stub.Predict(predictor_pb2.PredictRequest(tenant_id=tenants[int(rng.integers(len(tenants)))], features=x),
                         timeout=5)
        except grpc.RpcError:
            pass


def time_router_start(fleet: LocalFleet) -> tuple[float, float, str]:
    started = time.monotonic()
    router = fleet.start_router(shard_size=2)
    return time.monotonic() - started, rss_mb(router.popen.pid), router.address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--pins", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modelfleet-bench-versions-"))
    etcd = EtcdServer(data_dir=root / "etcd").start()
    fleet = LocalFleet(etcd.endpoint, f"/bench/{uuid.uuid4().hex[:8]}", root / "fleet")
    empty = LocalFleet(etcd.endpoint, f"/bench/{uuid.uuid4().hex[:8]}", root / "empty")
    rows: list[tuple[str, str]] = []
    try:
        models = [fleet.model_file(i) for i in range(8)]
        manifest = root / "manifest.csv"
        manifest.write_text("tenant,version,artifact\n" + "".join(
            f"tenant-{i:06d},v1,{models[i % 8]}\n" for i in range(args.tenants)))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "modelfleet.cli", "import", str(manifest), "--json"],
                              env=fleet.env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout)
        rows += [(f"import {args.tenants} records: registration (etcd)", f"{result['registration_seconds']:.1f} s"),
                 ("import: artifact phase (hash, check, copy; 8 files)", f"{result['artifact_seconds']:.1f} s"),
                 ("import: whole command, process start included", f"{time.monotonic() - started:.1f} s")]

        fleet.register("probe", "v1", seed=1)
        fleet.register("probe", "v2", seed=2)
        fleet.start_workers([("w1", "default"), ("w2", "default")])
        empty.start_workers([("e1", "default")])
        seconds, rss_full, address = time_router_start(fleet)
        _, rss_empty, _ = time_router_start(empty)
        rows += [(f"router start to SERVING with {args.tenants + 1} tenants", f"{seconds:.2f} s"),
                 ("router RSS: full fleet / empty fleet / growth",
                  f"{rss_full:.0f} / {rss_empty:.0f} / {rss_full - rss_empty:.0f} MB")]

        stub = predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(address))
        x = sample_features(1, 1)[0].tolist()
        request = predictor_pb2.PredictRequest(tenant_id="probe", features=x)
        load = [mp.get_context("spawn").Process(target=background_load,
                                               args=(address, [f"tenant-{i:06d}" for i in range(0, 2000)],
                                                     args.pins * 0.5 + 30)) for _ in range(2)]
        for p in load:
            p.start()
        seen = {"version": stub.Predict(request, timeout=30).model_version, "at": 0.0}
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                version = stub.Predict(request, timeout=5).model_version
                if version != seen["version"]:
                    seen.update(version=version, at=time.monotonic())

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        delays = []
        for n in range(args.pins):
            target = "v1" if seen["version"] == "v2" else "v2"
            fleet.registry.pin("probe", target)
            committed = time.monotonic()
            fleet.wait_for(lambda: seen["version"] == target, timeout=10, what="the pin to be served")
            delays.append((seen["at"] - committed) * 1000)
        stop.set()
        for p in load:
            p.terminate()
        rows.append((f"pin commit -> first Predict with it, under load ({args.pins} pins)",
                     f"p50 {np.percentile(delays, 50):.1f} ms, p99 {np.percentile(delays, 99):.1f} ms, "
                     f"max {max(delays):.1f} ms"))
    finally:
        fleet.stop()
        empty.stop()
        etcd.cleanup()
        shutil.rmtree(root, ignore_errors=True)  # etcd's data, the fleets' stores and the manifest
    table = Table(title=f"version service at scale ({os.cpu_count()} cores)")
    table.add_column("measure")
    table.add_column("figure")
    for name, value in rows:
        table.add_row(name, value)
    Console(width=140).print(table)


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
