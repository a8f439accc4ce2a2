"""Real fleets for tests: worker and router processes over real gRPC, on free loopback ports.

Nothing here fakes a component: each worker and router is `python -m modelfleet.cli ...` in its
own process, talking to the session's real etcd. Waits are conditions with deadlines.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelfleet import processes
from modelfleet.demo_models import train_model_text
from modelfleet.store import LocalStore
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc, worker_pb2, worker_pb2_grpc
from version_service.etcd_client import connect
from version_service.membership import list_workers
from version_service.registry import Registry
from version_service.schema import Keys

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


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


@dataclass
class Fleet:
    etcd_endpoint: str
    prefix: str
    root: Path
    lease_ttl: int = 3
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store_dir = self.root / "store"
        self.client = connect(self.etcd_endpoint)
        self.keys = Keys(self.prefix)
        self.registry = Registry(self.client, self.keys, LocalStore(self.store_dir))
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)

    # -- processes -------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(MODELFLEET_ETCD=self.etcd_endpoint, MODELFLEET_PREFIX=self.prefix,
                   MODELFLEET_STORE=str(self.store_dir), MODELFLEET_HOME=str(self.root / "home"),
                   PYTHONPATH=str(REPO_ROOT))
        return env

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.root / f"{name}.log"
        fh = open(log_path, "ab")
        popen = processes.spawn([sys.executable, "-m", "modelfleet.cli", *argv], env=self.env(),
                                stdout=fh, stderr=fh)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_worker(self, worker_id: str, *, zone: str = "default", cache_bytes: int = 256 << 20,
                     extra: tuple[str, ...] = ()) -> Proc:
        proc = self._spawn(worker_id, ["worker", "--worker-id", worker_id, "--zone", zone, "--cache-bytes",
                                       str(cache_bytes), "--lease-ttl", str(self.lease_ttl), *extra])
        record = self.wait_for(lambda: next((w for w in list_workers(self.client, self.keys)
                                             if w.worker_id == worker_id), None), proc, f"{worker_id} to join")
        proc.address = record.address
        return proc

    def start_router(self, *, shard_size: int = 2, extra: tuple[str, ...] = ()) -> Proc:
        port = processes.free_port()
        proc = self._spawn(f"router-{port}", ["router", "--port", str(port), "--shard-size", str(shard_size), *extra])
        proc.address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(proc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            self.wait_for(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                          == health_pb2.HealthCheckResponse.SERVING, proc, "the router to serve")
        return proc

    def wait_for(self, predicate, proc: Proc | None = None, what: str = "condition", timeout: float = START_TIMEOUT):
        def check():
            if proc is not None and proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")
            return predicate()

        try:
            return processes.wait_for(check, timeout, what=what)
        except TimeoutError as exc:
            if isinstance(exc.__cause__, AssertionError):
                raise exc.__cause__ from None
            raise

    def stop(self) -> None:
        for proc in reversed(self.procs):
            processes.stop(proc.popen)
        self.client.close()

    # -- models ----------------------------------------------------------------------------
    def model_file(self, seed: int, objective: str = "regression", num_features: int = 8, **kw) -> Path:
        path = self.models_dir / f"{objective}-{seed}-{num_features}-{sorted(kw.items())}.txt"
        if not path.exists():
            path.write_text(train_model_text(seed, num_features=num_features, objective=objective, **kw))
        return path

    def register(self, tenant: str, version: str, seed: int, objective: str = "regression", **kw) -> Path:
        path = self.model_file(seed, objective, **kw)
        self.registry.register(tenant, version, path)
        return path


def predictor(address: str) -> predictor_pb2_grpc.PredictorStub:
    return predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(address))


def worker_stub(address: str) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def predict(stub, tenant: str, features, version: str = "", timeout: float = 10.0, metadata=None):
    return stub.Predict(predictor_pb2.PredictRequest(tenant_id=tenant, features=list(features), version=version),
                        timeout=timeout, metadata=metadata)


def stats(address: str, include_models: bool = False) -> worker_pb2.StatsResponse:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(include_models=include_models),
                                                          timeout=5)
