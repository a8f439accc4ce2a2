"""`modelfleet up`: the whole demo fleet in one command, torn down cleanly on Ctrl-C/SIGTERM.

It starts a local etcd on the CLI's default endpoint and uses the CLI's default store, so every
other command (`predict`, `versions`, `pin`, `shard`, `workers`) works against it with no flags.
Children die with this process (PR_SET_PDEATHSIG), so even `kill -9` leaves no orphans.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from modelfleet.config import _default_home, etcd_endpoints
from modelfleet.demo_models import OBJECTIVES, sample_features, train_model_text
from modelfleet.errors import FailedPrecondition
from modelfleet.etcd_server import EtcdServer
from modelfleet.local_fleet import LocalFleet
from version_service.registry import Registry

DEMO_FEATURES = 8


def demo_tenant(i: int) -> str:
    return f"demo-{i:04d}"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


class _Stopped(Exception):
    """Ctrl-C or SIGTERM during start-up, noticed at the next step."""


def register_demo_tenants(registry: Registry, count: int, model_dir: Path,
                          step_done: Callable[[], None] = lambda: None) -> None:
    """Trains one real model per demo tenant (objectives rotate) and registers it as v1;
    every tenth tenant also gets a v2, so pinning has something to pin. `step_done` is called
    before each tenant (it raises to stop)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        step_done()
        tenant = demo_tenant(i)
        objective = OBJECTIVES[(i - 1) % len(OBJECTIVES)]
        for version, seed in (("v1", i), ("v2", 100_000 + i)) if i % 10 == 0 else (("v1", i),):
            path = model_dir / f"{tenant}-{version}.txt"
            if not path.exists():
                path.write_text(train_model_text(seed, num_features=DEMO_FEATURES, objective=objective))
            registry.register(tenant, version, path)


def run(args: argparse.Namespace) -> int:
    (_, etcd_port), = etcd_endpoints(args.etcd)[:1]
    for what, port in (("etcd", etcd_port), ("router", args.port)):
        if not _port_free("127.0.0.1", port):
            raise FailedPrecondition(f"port {port} for the demo {what} is in use: is another fleet running?")
    home = _default_home()
    home.mkdir(parents=True, exist_ok=True)
    # no data_dir: the server makes a temporary one and owns it, so cleanup() removes it (~60 MB a run)
    etcd = EtcdServer(client_port=etcd_port, log_path=home / "etcd.log")
    # The handlers only set `stopping`; start-up looks at it between its steps (each tenant, each
    # process started). Raising from a handler instead could leave a lock held mid-step, and the
    # clean-up would then wait on it forever.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    def step_done() -> None:
        if stopping.is_set():
            raise _Stopped

    fleet: LocalFleet | None = None
    try:
        print(f"starting etcd on 127.0.0.1:{etcd_port} ...", flush=True)
        etcd.start()
        step_done()
        fleet = LocalFleet(args.etcd, args.prefix, home, store_dir=Path(args.store), lease_ttl=args.lease_ttl)
        print(f"training and registering {args.demo_tenants} demo tenants into {args.store} ...", flush=True)
        register_demo_tenants(fleet.registry, args.demo_tenants, home / "demo-models", step_done)
        fleet.registry.close()  # nothing more to check: the checker's child goes now, not when idle
        step_done()
        print(f"starting {args.workers} workers and a router ...", flush=True)
        fleet.start_workers([(f"worker-{n}", f"zone-{'abc'[(n - 1) % 3]}") for n in range(1, args.workers + 1)],
                            cache_bytes=args.cache_bytes)
        step_done()
        router = fleet.start_router(port=args.port, shard_size=args.shard_size).address
        example = ",".join(f"{v:.3f}" for v in sample_features(1, 1, DEMO_FEATURES)[0])
        print(f"""
modelfleet is up: router on {router}, {args.workers} workers, {args.demo_tenants} demo tenants (demo-0001 ...).
logs in {home}

  .venv/bin/modelfleet predict demo-0001 --features {example}
  .venv/bin/modelfleet versions demo-0010
  .venv/bin/modelfleet pin demo-0010 v1
  .venv/bin/modelfleet shard demo-0001
  .venv/bin/modelfleet workers
  .venv/bin/modelfleet shards report
  grpcurl -plaintext -d '{{"tenant_id":"demo-0001","features":[{example.replace("nan", '"NaN"')}]}}' \\
      {router} modelfleet.v1.Predictor/Predict

Ctrl-C stops everything.""", flush=True)
        while not stopping.wait(0.5):
            for proc in fleet.procs:
                if not proc.alive():
                    print(f"{proc.name} exited with code {proc.popen.returncode}; see {proc.log_path}; shutting down",
                          file=sys.stderr)
                    stopping.set()
        return 0
    except (ChildProcessError, _Stopped) as exc:
        if stopping.is_set():  # Ctrl-C or SIGTERM during start-up: a clean stop, not an error
            return 0
        raise FailedPrecondition(str(exc).splitlines()[0]) from None
    finally:
        print("stopping the demo fleet ...", flush=True)
        if fleet is not None:
            fleet.stop()
        etcd.cleanup()
        print("stopped", flush=True)


