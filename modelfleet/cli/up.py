"""`modelfleet up`: the whole demo fleet in one command, torn down cleanly on Ctrl-C/SIGTERM.

It starts a local etcd on the CLI's default endpoint and uses the CLI's default store, so every
other command (`predict`, `versions`, `pin`, `shard`, `workers`) works against it with no flags.
Children die with this process (PR_SET_PDEATHSIG), so even `kill -9` leaves no orphans.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from modelfleet import processes
from modelfleet.config import _default_home, etcd_endpoints
from modelfleet.demo_models import OBJECTIVES, sample_features, train_model_text
from modelfleet.errors import FailedPrecondition
from modelfleet.etcd_server import EtcdServer
from modelfleet.store import LocalStore
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from version_service.etcd_client import connect
from version_service.registry import Registry
from version_service.schema import Keys

DEMO_FEATURES = 8


def demo_tenant(i: int) -> str:
    return f"demo-{i:04d}"


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def register_demo_tenants(registry: Registry, count: int, model_dir: Path) -> None:
    """Trains one real model per demo tenant (objectives rotate) and registers it as v1;
    every tenth tenant also gets a v2, so pinning has something to pin."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        tenant = demo_tenant(i)
        objective = OBJECTIVES[(i - 1) % len(OBJECTIVES)]
        for version, seed in (("v1", i), ("v2", 100_000 + i)) if i % 10 == 0 else (("v1", i),):
            path = model_dir / f"{tenant}-{version}.txt"
            if not path.exists():
                path.write_text(train_model_text(seed, num_features=DEMO_FEATURES, objective=objective))
            registry.register(tenant, version, path)


def run(args: argparse.Namespace) -> int:
    (host, etcd_port), = etcd_endpoints(args.etcd)[:1]
    for what, port in (("etcd", etcd_port), ("router", args.port)):
        if not _port_free("127.0.0.1", port):
            raise FailedPrecondition(f"port {port} for the demo {what} is in use: is another fleet running?")
    home = _default_home()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children: list[tuple[str, subprocess.Popen]] = []
    etcd = EtcdServer(client_port=etcd_port, data_dir=Path(tempfile.mkdtemp(prefix="modelfleet-up-etcd-")),
                      log_path=logs / "etcd.log")
    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print(f"starting etcd on 127.0.0.1:{etcd_port} ...", flush=True)
        etcd.start()
        env = dict(os.environ, MODELFLEET_ETCD=args.etcd, MODELFLEET_PREFIX=args.prefix, MODELFLEET_STORE=args.store)
        python = [sys.executable, "-m", "modelfleet.cli"]
        for n in range(1, args.workers + 1):
            log_file = open(logs / f"worker-{n}.log", "ab")
            children.append((f"worker-{n}", processes.spawn(
                [*python, "worker", "--worker-id", f"worker-{n}", "--zone", f"zone-{'abc'[(n - 1) % 3]}",
                 "--cache-bytes", str(args.cache_bytes), "--lease-ttl", str(args.lease_ttl)],
                env=env, stdout=log_file, stderr=log_file)))
        registry = Registry(connect(args.etcd), Keys(args.prefix), LocalStore(args.store))
        print(f"training and registering {args.demo_tenants} demo tenants into {args.store} ...", flush=True)
        register_demo_tenants(registry, args.demo_tenants, home / "demo-models")
        log_file = open(logs / "router.log", "ab")
        children.append(("router", processes.spawn(
            [*python, "router", "--port", str(args.port), "--shard-size", str(args.shard_size)],
            env=env, stdout=log_file, stderr=log_file)))
        router = f"127.0.0.1:{args.port}"
        try:
            _wait_until_serving(router, children, stopping)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM during start-up: a clean stop, not an error
            return 0
        example = ",".join(f"{v:.3f}" for v in sample_features(1, 1, DEMO_FEATURES)[0])
        print(f"""
modelfleet is up: router on {router}, {args.workers} workers, {args.demo_tenants} demo tenants (demo-0001 ...).
logs in {logs}

  .venv/bin/modelfleet predict demo-0001 --features {example}
  .venv/bin/modelfleet versions demo-0010
  .venv/bin/modelfleet pin demo-0010 v1
  .venv/bin/modelfleet shard demo-0001
  .venv/bin/modelfleet workers
  grpcurl -plaintext -d '{{"tenant_id":"demo-0001","features":[{example}]}}' {router} modelfleet.v1.Predictor/Predict

Ctrl-C stops everything.""", flush=True)
        while not stopping.wait(0.5):
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; see {logs}; shutting down", file=sys.stderr)
                    stopping.set()
        return 0
    finally:
        print("stopping the demo fleet ...", flush=True)
        for _, proc in reversed(children):
            processes.stop(proc)
        etcd.cleanup()
        print("stopped", flush=True)


def _wait_until_serving(router: str, children, stopping: threading.Event, timeout: float = 60.0) -> None:
    request = predictor_pb2.PredictRequest(tenant_id=demo_tenant(1),
                                           features=sample_features(1, 1, DEMO_FEATURES)[0].tolist())
    channel = grpc.insecure_channel(router)
    stub = predictor_pb2_grpc.PredictorStub(channel)

    def serving() -> bool:
        if stopping.is_set():
            raise KeyboardInterrupt
        for name, proc in children:
            if proc.poll() is not None:
                raise FailedPrecondition(f"{name} exited with code {proc.returncode} during start-up")
        stub.Predict(request, timeout=2)
        return True

    try:
        processes.wait_for(serving, timeout, interval=0.1, what=f"the router on {router} to serve")
    except TimeoutError as exc:
        cause = exc.__cause__
        if isinstance(cause, FailedPrecondition):
            raise cause from None
        raise FailedPrecondition(f"{exc}: {cause}") from None
    finally:
        channel.close()
