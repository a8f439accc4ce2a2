"""A fleet of real processes on this machine: for `modelfleet up`, the tests and the benchmarks.

Every worker and router is `python -m modelfleet.cli ...` in its own process (dying with its
parent), talking real gRPC on loopback to a real etcd. Starting one waits for a condition with
a deadline: a worker until it is registered, a router until its health check says SERVING.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelfleet import allocator, processes, tls
from modelfleet.artifact_check import ArtifactChecker
from modelfleet.demo_models import train_model_text
from modelfleet.store import LocalStore
from version_service.etcd_client import connect
from version_service.membership import list_workers
from version_service.registry import Registry
from version_service.schema import Keys

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
# The start probe's first calls find nothing listening yet; gRPC's default would then wait 1 s
# before connecting again, so every router start took ~1 s however soon it served.
_PROBE_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 100)]
T = TypeVar("T")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    address: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LocalFleet:
    etcd_endpoint: str
    prefix: str
    root: Path  # logs and trained models; the store defaults to root/store
    store_dir: Path | None = None
    lease_ttl: int = 3
    checker: ArtifactChecker | None = None  # shared by fleets that come and go (the tests'); else the registry's own
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.store_dir = Path(self.store_dir or self.root / "store")
        self.client = connect(self.etcd_endpoint)
        self.keys = Keys(self.prefix)
        self.registry = Registry(self.client, self.keys, LocalStore(self.store_dir), checker=self.checker)
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)

    # -- processes -------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(MODELFLEET_ETCD=self.etcd_endpoint, MODELFLEET_PREFIX=self.prefix,
                   MODELFLEET_STORE=str(self.store_dir), MODELFLEET_HOME=str(self.root / "home"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        return allocator.preload_env(env)  # children start on their malloc, without re-executing

    def spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as fh:
            popen = processes.spawn([sys.executable, "-m", "modelfleet.cli", *argv], env=self.env(),
                                    stdout=fh, stderr=fh)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_worker(self, worker_id: str, *, zone: str = "default", cache_bytes: int = 256 << 20,
                     extra: tuple[str, ...] = ()) -> Proc:
        return self.start_workers([(worker_id, zone)], cache_bytes=cache_bytes, extra=extra)[0]

    def start_workers(self, specs: list[tuple[str, str]], *, cache_bytes: int = 256 << 20,
                      extra: tuple[str, ...] = (), each: Sequence[tuple[str, ...]] = ()) -> list[Proc]:
        """Starts (worker_id, zone) workers side by side; returns once each is live in membership.
        `each[i]`, where given, are the i-th worker's own flags (after `extra`).

        A worker restarted under an id whose dead process's record is still leased is live once a
        record other than that one is: the old record would otherwise pass at once."""
        before = {w.worker_id: w.started for w in list_workers(self.client, self.keys)}
        procs = [self.spawn(worker_id, ["worker", "--worker-id", worker_id, "--zone", zone, "--cache-bytes",
                                        str(cache_bytes), "--lease-ttl", str(self.lease_ttl), *extra,
                                        *(each[i] if i < len(each) else ())])
                 for i, (worker_id, zone) in enumerate(specs)]
        for proc in procs:
            record = self.wait_for(lambda: next((w for w in list_workers(self.client, self.keys)
                                                 if w.worker_id == proc.name and not w.joining
                                                 and w.started != before.get(proc.name)), None),
                                   proc, f"{proc.name} to join")
            proc.address = record.address
        return procs

    def start_router(self, *, port: int = 0, shard_size: int = 2, extra: tuple[str, ...] = (),
                     health_credentials: grpc.ChannelCredentials | None = None) -> Proc:
        return self.start_routers(1, port=port, shard_size=shard_size, extra=extra,
                                  health_credentials=health_credentials)[0]

    def start_routers(self, count: int, *, port: int = 0, shard_size: int = 2, extra: tuple[str, ...] = (),
                      health_credentials: grpc.ChannelCredentials | None = None,
                      each: Sequence[tuple[str, ...]] = ()) -> list[Proc]:
        """Starts `count` routers side by side (on free ports, or `port` for one); returns once each serves.
        `each[i]`, where given, are the i-th router's own flags (after `extra`)."""
        ports = [port] if port and count == 1 else [processes.free_port() for _ in range(count)]
        procs = []
        for i, port in enumerate(ports):
            own = each[i] if i < len(each) else ()
            proc = self.spawn(f"router-{port}", ["router", "--port", str(port), "--shard-size", str(shard_size),
                                                 *extra, *own])
            proc.address = f"127.0.0.1:{port}"
            procs.append(proc)
        for proc in procs:
            with tls.channel(proc.address, health_credentials, options=_PROBE_OPTIONS, aio=False) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                self.wait_for(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                              == health_pb2.HealthCheckResponse.SERVING, proc, "the router to serve")
        return procs

    def wait_for(self, predicate: Callable[[], T], proc: Proc | None = None, what: str = "condition",
                 timeout: float = START_TIMEOUT) -> T:
        """predicate's first truthy value; fails fast with the log if `proc` exits meanwhile."""
        def check():
            if proc is not None and not proc.alive():
                raise ChildProcessError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")
            return predicate()

        try:
            return processes.wait_for(check, timeout, what=what)
        except TimeoutError as exc:
            if isinstance(exc.__cause__, ChildProcessError):
                raise exc.__cause__ from None
            raise

    def stop(self) -> None:
        processes.stop_all([proc.popen for proc in reversed(self.procs)])
        self.registry.close()
        self.client.close()

    # -- models ----------------------------------------------------------------------------
    def model_file(self, seed: int, objective: str = "regression", num_features: int = 8, **kw) -> Path:
        """A real trained LightGBM model (cached on disk by its parameters)."""
        extra = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        path = self.models_dir / f"{objective}-{seed}-{num_features}-{extra}.txt"
        if not path.exists():
            path.write_text(train_model_text(seed, num_features=num_features, objective=objective, **kw))
        return path

    def register(self, tenant: str, version: str, seed: int, objective: str = "regression", **kw) -> Path:
        path = self.model_file(seed, objective, **kw)
        self.registry.register(tenant, version, path)
        return path
