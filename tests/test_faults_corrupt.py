"""A corrupt artifact, on real processes: only its tenant fails, with FAILED_PRECONDITION naming
tenant, version and cause; the worker keeps serving everyone else; the failed load is remembered
for a back-off (one load across many requests), and a repaired artifact serves again after it."""
from __future__ import annotations

import time

import grpc

from modelfleet.demo_models import sample_features
from tests.fleet import predict, predictor, stats

OTHERS = ["a", "b", "c"]


def test_corrupt_artifact_fails_only_its_tenant_and_the_failure_is_cached(fleet):
    for i, tenant in enumerate(OTHERS):
        fleet.register(tenant, "v1", seed=i)
    fleet.register("fragile", "v1", seed=99)
    artifact = fleet.store_dir / fleet.registry.version("fragile", "v1").artifact
    good = artifact.read_bytes()
    artifact.write_bytes(good[:-100] + b"garbage")
    workers = fleet.start_workers([(f"w{n}", "default") for n in range(1, 4)])
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    for tenant in OTHERS:
        fleet.wait_for(lambda: predict(stub, tenant, x), what="warm-up")

    started = time.monotonic()
    errors = []
    for i in range(100):
        try:
            predict(stub, "fragile", x)
            raise AssertionError("a corrupt artifact was served")
        except grpc.RpcError as exc:
            errors.append(exc)
        assert predict(stub, OTHERS[i % 3], x).model_version == "v1"  # everyone else keeps serving
    elapsed = time.monotonic() - started
    assert {e.code() for e in errors} == {grpc.StatusCode.FAILED_PRECONDITION}
    for e in errors:
        assert "'fragile'" in e.details() and "'v1'" in e.details() and "corrupt" in e.details(), e.details()
    failed_loads = sum(stats(w.address).load_failures_total for w in workers)
    print(f"corrupt artifact: 100 requests in {elapsed:.2f} s -> {failed_loads} failed load(s); "
          f"e.g. {errors[-1].details()!r}")
    if elapsed < 1.0:  # all within the first back-off (1 s)
        assert failed_loads == 1
    assert failed_loads <= 1 + elapsed  # back-off 1 s, 2 s, 4 s, ...: never one per request
    assert all(p.alive() for p in fleet.procs)

    artifact.write_bytes(good)  # repaired in place (same digest): served once the back-off ends
    repaired = time.monotonic()
    fleet.wait_for(lambda: predict(stub, "fragile", x).model_version == "v1", timeout=10,
                   what="the repaired tenant to serve")
    print(f"repaired artifact served after {time.monotonic() - repaired:.2f} s")
