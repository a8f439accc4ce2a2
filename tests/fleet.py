"""Test conveniences over modelfleet.local_fleet: real processes, real gRPC, real etcd."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import grpc

from modelfleet.local_fleet import REPO_ROOT, LocalFleet as Fleet, Proc  # noqa: F401 - re-exported for tests
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc, worker_pb2, worker_pb2_grpc


def predictor(address: str) -> predictor_pb2_grpc.PredictorStub:
    return predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(address))


def worker_stub(address: str) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def predict(stub, tenant: str, features, version: str = "", timeout: float = 10.0, metadata=None, artifact: str = ""):
    return stub.Predict(predictor_pb2.PredictRequest(tenant_id=tenant, features=list(features), version=version,
                                                     artifact_sha256=artifact), timeout=timeout, metadata=metadata)


def stats(address: str, include_models: bool = False) -> worker_pb2.StatsResponse:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(include_models=include_models),
                                                          timeout=5)


def logged_line(fleet: Fleet, proc: Proc, event: str) -> str:
    """The first line of proc's log naming `event`, waiting for it: a process reports SERVING on
    its health service a moment before it logs `*.serving`, and a worker is live in membership
    before either."""
    return fleet.wait_for(lambda: next((line for line in proc.log().splitlines() if event in line), None), proc,
                          f"{proc.name} to log {event}", timeout=10)


def serve_and_warm(fleet: Fleet, tenants, shard_size: int = 2):
    """Two workers and a router over the registered `tenants`, each tenant answered once (its
    model loaded on its first member): (workers, router, router stub, one feature row)."""
    from modelfleet.demo_models import sample_features

    workers = fleet.start_workers([("w1", "default"), ("w2", "default")])
    router = fleet.start_router(shard_size=shard_size)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    for tenant in tenants:
        fleet.wait_for(lambda: predict(stub, tenant, x), what="warm-up")
    return workers, router, stub, x


def register_many(fleet: Fleet, pairs: Iterable[tuple[str, str]], model: Path) -> None:
    """Registers each (tenant, version) with one model file, as bulk import does: a few etcd
    transactions in all, ~0.2 s for 300 where a register each costs ~50 ms (a 4 MB model is
    read and hashed per register)."""
    from version_service.bulk_import import ManifestRow, import_manifest

    rows = [ManifestRow(line, tenant, version, Path(model)) for line, (tenant, version) in enumerate(pairs, 2)]
    result = import_manifest(fleet.registry, rows, "test")
    assert (result.registered, result.rejected) == (len(rows), []), result
