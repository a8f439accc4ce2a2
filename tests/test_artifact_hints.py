"""Routers send the serving version's artifact digest with each request; a worker that misses
loads that artifact without reading etcd, and a wrong digest from any caller never changes what
anyone else is served."""
from __future__ import annotations

import grpc
import pytest

from modelfleet.demo_models import sample_features
from version_service.schema import RouteRecord
from worker.artifact_hint import FIELD
from worker.predictor import LoadedModel
from tests.fleet import predict, predictor, stats, worker_stub

X = sample_features(3, 1)[0]


def expected(path) -> list[float]:
    model = LoadedModel.from_model_text(path.read_bytes())
    try:
        return model.predict(X)
    finally:
        model.close()


def test_with_changes_never_keeps_another_versions_digest():
    route = RouteRecord(serving="v1", newest="v1", serving_sha256="a" * 64)
    assert route.with_changes(serving="v2").serving_sha256 is None
    assert route.with_changes(newest="v2", pinned=True).serving_sha256 == "a" * 64
    assert route.with_changes(serving="v1").serving_sha256 == "a" * 64
    assert route.with_changes(serving="v2", serving_sha256="b" * 64).serving_sha256 == "b" * 64


def test_the_route_names_the_serving_artifact_through_every_change(fleet):
    for i, version in enumerate(("v1", "v2"), 1):
        fleet.register("acme", version, seed=i)

    def route() -> RouteRecord:
        return fleet.registry.route("acme")[0]

    def serves(version: str) -> bool:
        now = route()
        return now.serving == version and now.serving_sha256 == fleet.registry.version("acme", version).sha256

    assert serves("v2")
    fleet.registry.pin("acme", "v1")
    assert serves("v1")
    fleet.register("acme", "v3", seed=3)  # pinned: still v1, still v1's artifact
    assert serves("v1")
    fleet.registry.start_rollout("acme", "v3", percent=10)
    assert serves("v1")
    fleet.registry.promote("acme")
    assert serves("v3")
    fleet.registry.rollback("acme")
    assert serves("v1")
    fleet.registry.unpin("acme")
    assert serves("v3")
    # A route written without a digest (by an older tool) gets one with its next change.
    fleet.client.put(fleet.keys.route("acme"), route().with_changes(serving_sha256=None).to_json())
    fleet.registry.set_limits("acme", rate=100)
    assert serves("v3")


def test_a_worker_loads_a_model_it_never_saw_while_etcd_is_down(own_etcd_fleet):
    etcd, fleet = own_etcd_fleet
    fleet.register("seen", "v1", seed=1)
    never_seen = fleet.register("cold", "v1", seed=2)
    fleet.register("direct", "v1", seed=3)
    worker = fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    fleet.wait_for(lambda: predict(stub, "seen", X), what="the router serving")
    etcd.stop()
    assert list(predict(stub, "cold", X).predictions) == expected(never_seen)
    assert stats(worker.address).loads_total == 2
    with pytest.raises(grpc.RpcError) as refused:  # no hint: the worker needs the record, from etcd
        predict(worker_stub(worker.address), "direct", X, version="v1")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_wrong_artifact_hint_is_never_served_to_anyone_else(fleet):
    a_path, b_path = fleet.register("a", "v1", seed=1), fleet.register("b", "v1", seed=2)
    fleet.register("c", "v1", seed=3)
    d_paths = {v: fleet.register("d", v, seed=s) for v, s in (("v1", 4), ("v2", 5))}  # serving v2
    sha = {t: fleet.registry.version(t, "v1").sha256 for t in "ab"}
    worker = fleet.start_worker("w1")
    router = predictor(fleet.start_router(shard_size=1).address)
    direct = worker_stub(worker.address)

    # A direct caller names b's artifact for a cold a: its own request gets what it named...
    assert list(predict(direct, "a", X, version="v1", artifact=sha["b"]).predictions) == expected(b_path)
    # ...and the router's request (a's digest, from the route) finds the cached model is not a's
    # registered artifact: it is settled against the record, evicted and a's artifact loaded.
    assert list(predict(router, "a", X).predictions) == expected(a_path)
    assert stats(worker.address).artifact_mismatches_total == 1
    # Now a is cached as registered: the wrong hint is settled against the record and loses.
    assert list(predict(direct, "a", X, version="v1", artifact=sha["b"]).predictions) == expected(a_path)

    # A model loaded from a hint is checked before a caller without a hint gets it.
    assert list(predict(direct, "b", X, version="v1", artifact=sha["a"]).predictions) == expected(a_path)
    assert list(predict(direct, "b", X, version="v1").predictions) == expected(b_path)
    s = stats(worker.address)
    assert s.artifact_mismatches_total == 2 and s.loads_total == 4

    # A hint naming an artifact the store lacks fails that caller, and its remembered failure
    # is not handed to the router's requests for the same tenant.
    with pytest.raises(grpc.RpcError) as missing:
        predict(direct, "c", X, version="v1", artifact="0" * 64)
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(predict(router, "c", X).predictions) == 1

    with pytest.raises(grpc.RpcError) as malformed:
        predict(direct, "c", X, version="v1", artifact="not-a-digest")
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert FIELD in malformed.value.details()

    # The router owns the field: a caller's digest for a cold tenant is replaced by the route's,
    # or dropped for a version the route does not name.
    assert list(predict(router, "d", X, version="v1", artifact=sha["a"]).predictions) == expected(d_paths["v1"])
    assert list(predict(router, "d", X, artifact=sha["a"]).predictions) == expected(d_paths["v2"])
