"""The whole Predict path on real parts: etcd, 3 worker processes, a router process, real models."""
from __future__ import annotations

import time

import grpc
import lightgbm
import numpy as np
import pytest

from modelfleet.demo_models import sample_features
from modelfleet.v1 import predictor_pb2, router_admin_pb2, router_admin_pb2_grpc, worker_pb2
from sharding import Member, shard_for
from tests.conftest import new_prefix
from tests.fleet import Fleet, predict, predictor, worker_stub
from version_service.membership import list_workers

TENANTS = {"reg": "regression", "bin": "binary", "multi": "multiclass"}


@pytest.fixture(scope="module")
def running(etcd, tmp_path_factory, artifact_checker):
    fleet = Fleet(etcd.endpoint, new_prefix(), tmp_path_factory.mktemp("fleet"), checker=artifact_checker)
    for seed, (tenant, objective) in enumerate(TENANTS.items(), start=1):
        fleet.register(tenant, "v1", seed=seed, objective=objective)
    fleet.register("pinny", "v1", seed=11)
    fleet.register("pinny", "v2", seed=12)
    fleet.start_workers([(f"w{n}", "default") for n in range(1, 4)])
    router = fleet.start_router()
    stub = predictor(router.address)
    fleet.wait_for(lambda: predict(stub, "reg", sample_features(0, 1)[0]), what="first predict")
    yield fleet, stub
    fleet.stop()


def reference(fleet: Fleet, tenant: str, version: str, rows: np.ndarray) -> np.ndarray:
    record = fleet.registry.version(tenant, version)
    booster = lightgbm.Booster(model_file=str(fleet.store_dir / record.artifact))
    return np.asarray(booster.predict(rows)).reshape(-1)


@pytest.mark.parametrize("tenant", list(TENANTS))
@pytest.mark.parametrize("rows", [1, 100])
def test_predictions_equal_lightgbm(running, tenant, rows):
    fleet, stub = running
    x = sample_features(rows + 7, rows)  # includes NaNs
    response = predict(stub, tenant, x.reshape(-1))
    expected = reference(fleet, tenant, "v1", x)
    classes = 3 if TENANTS[tenant] == "multiclass" else 1
    assert len(response.predictions) == rows * classes
    np.testing.assert_allclose(response.predictions, expected, rtol=0, atol=1e-9)
    assert response.model_version == "v1"
    live = [Member(f"w{n}") for n in range(1, 4)]
    assert response.worker_id in shard_for(tenant, live, 2)


def test_explicit_version_is_served(running):
    fleet, stub = running
    x = sample_features(3, 2)
    response = predict(stub, "pinny", x.reshape(-1), version="v1")
    assert response.model_version == "v1"
    np.testing.assert_allclose(response.predictions, reference(fleet, "pinny", "v1", x), atol=1e-9)


def test_a_batch_that_says_its_row_width_is_never_read_with_another(running):
    """40 values are 5 rows of 8 or 4 rows of 10: a caller that says 10 per row to an 8-feature
    model is refused, not answered for rows it did not mean."""
    fleet, stub = running
    x = sample_features(4, 5)
    request = predictor_pb2.PredictRequest(tenant_id="reg", features=x.reshape(-1), features_per_row=8)
    np.testing.assert_allclose(stub.Predict(request, timeout=10).predictions, reference(fleet, "reg", "v1", x),
                               atol=1e-9)
    request.features_per_row = 10
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes 8 features per row; the request's rows have 10" in refused.value.details()


def _served_version(stub, tenant: str) -> str:
    return predict(stub, tenant, sample_features(5, 1)[0]).model_version


def test_pin_and_unpin_switch_the_served_version_within_a_second(running):
    fleet, stub = running
    assert _served_version(stub, "pinny") == "v2"
    fleet.registry.pin("pinny", "v1")
    committed = time.monotonic()
    fleet.wait_for(lambda: _served_version(stub, "pinny") == "v1", timeout=1.0, what="pin to take effect")
    assert time.monotonic() - committed < 1.0
    fleet.registry.unpin("pinny")
    committed = time.monotonic()
    fleet.wait_for(lambda: _served_version(stub, "pinny") == "v2", timeout=1.0, what="unpin to take effect")
    assert time.monotonic() - committed < 1.0


def _error(stub, tenant, features, version="") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        predict(stub, tenant, features, version=version)
    return info.value


def test_unknown_tenant_is_not_found_naming_it(running):
    _, stub = running
    err = _error(stub, "no-such-tenant", [1.0] * 8)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no-such-tenant" in err.details()


def test_wrong_feature_count_is_invalid_argument_with_expected_and_got(running):
    _, stub = running
    err = _error(stub, "reg", [1.0] * 5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8" in err.details() and "5" in err.details() and "reg" in err.details()


def test_empty_features_are_invalid_argument(running):
    _, stub = running
    err = _error(stub, "reg", [])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.details()


def test_unknown_version_is_not_found(running):
    _, stub = running
    err = _error(stub, "reg", [1.0] * 8, version="v999")
    assert err.code() == grpc.StatusCode.NOT_FOUND and "v999" in err.details()


def test_a_worker_stream_answers_each_frame_as_a_unary_call_would(running):
    """Frames to a real worker, as a router sends them: each gets the status a unary Predict would,
    a bad one does not end the stream, and the stream ends cleanly once the sender half-closes."""
    fleet, _ = running
    address = next(w.address for w in list_workers(fleet.client, fleet.keys) if w.worker_id == "w1")
    stub = worker_stub(address)
    row = list(sample_features(5, 1).reshape(-1))
    cases = {  # frame id -> (tenant, version, features, the code a unary Predict gets)
        1: ("reg", "v1", row, grpc.StatusCode.OK),
        2: ("reg", "v1", row[:5], grpc.StatusCode.INVALID_ARGUMENT),
        3: ("a/b", "v1", row, grpc.StatusCode.INVALID_ARGUMENT),
        4: ("no-such-tenant", "v1", row, grpc.StatusCode.NOT_FOUND),
        5: ("reg", "v999", row, grpc.StatusCode.NOT_FOUND),
        6: ("reg", "", row, grpc.StatusCode.INVALID_ARGUMENT),  # a worker needs the version resolved
        7: ("bin", "v1", row, grpc.StatusCode.OK),
    }
    frames = [worker_pb2.PredictFrame(id=i, timeout_ms=10_000, request=predictor_pb2.PredictRequest(
        tenant_id=tenant, version=version, features=features)) for i, (tenant, version, features, _) in cases.items()]
    frames.append(worker_pb2.PredictFrame(id=99, cancel=True))  # cancelling what is not in flight: ignored
    messages = [worker_pb2.PredictFrames(frames=frames[:3]), worker_pb2.PredictFrames(frames=frames[3:])]
    outcomes = {o.id: o for batch in stub.PredictStream(iter(messages), timeout=30) for o in batch.outcomes}
    assert set(outcomes) == set(cases)
    for frame_id, (tenant, version, features, code) in cases.items():
        outcome = outcomes[frame_id]
        assert outcome.code == code.value[0], (frame_id, outcome)
        if code == grpc.StatusCode.OK:
            unary = stub.Predict(frames[frame_id - 1].request, timeout=10)
            assert list(outcome.response.predictions) == list(unary.predictions) and outcome.response.worker_id == "w1"
        else:
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(frames[frame_id - 1].request, timeout=10)
            assert raised.value.code() == code  # the same message (a remembered load failure adds a note)
            assert outcome.details and raised.value.details().startswith(outcome.details)


@pytest.mark.parametrize("tenant,version", [("../etc", ""), ("a/b", ""), ("x" * 200, ""), ("reg", "../v1"),
                                            ("reg", "v 1"), ("", "")])
def test_malformed_ids_are_invalid_argument(running, tenant, version):
    _, stub = running
    err = _error(stub, tenant, [1.0] * 8, version=version)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err


def test_corrupt_artifact_fails_only_its_tenant(running):
    fleet, stub = running
    fleet.register("fragile", "v1", seed=99)
    record = fleet.registry.version("fragile", "v1")
    artifact = fleet.store_dir / record.artifact
    artifact.write_bytes(artifact.read_bytes()[:-100] + b"garbage")
    fleet.wait_for(lambda: running[0].registry.route("fragile"), what="route")

    def corrupt_error():
        try:
            predict(stub, "fragile", [1.0] * 8)
        except grpc.RpcError as exc:
            return exc if exc.code() != grpc.StatusCode.NOT_FOUND else None  # route not yet in the cache
        raise AssertionError("a corrupt artifact was served")

    err = fleet.wait_for(corrupt_error, what="the corrupt tenant to be routed")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fragile" in err.details() and "corrupt" in err.details()
    for tenant in TENANTS:  # everyone else keeps serving, every worker is alive
        assert predict(stub, tenant, sample_features(1, 1)[0]).model_version == "v1"
    assert all(p.popen.poll() is None for p in fleet.procs)


def test_router_serves_health_and_reflection(running):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    fleet, _ = running
    router = next(p for p in fleet.procs if p.name.startswith("router"))
    with grpc.insecure_channel(router.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "modelfleet.v1.Predictor"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"modelfleet.v1.Predictor", "modelfleet.v1.RouterAdmin", "grpc.health.v1.Health"} <= set(services)
        status = router_admin_pb2_grpc.RouterAdminStub(channel).Status(router_admin_pb2.RouterStatusRequest(),
                                                                      timeout=5)
    _, meta = fleet.client.get(fleet.keys.route("pinny"))
    assert status.etcd_connected and status.revision >= meta.mod_revision
    assert status.tenants >= 4 and status.live_workers == 3 and status.router_id
