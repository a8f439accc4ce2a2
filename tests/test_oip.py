"""The Open Inference Protocol (KServe V2 gRPC) on a real `modelfleet router` process.

Real parts as in test_predict_path: etcd, worker processes, the router process, trained models.
First through the generated stubs (modelfleet.oip), then through stock tritonclient in its own
process (tests/tritonclient_check.py): tritonclient's generated code claims the same `inference.*`
names in protobuf's default pool, so it never shares a process with modelfleet.oip.
"""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import lightgbm
import numpy as np
import pytest

from modelfleet.demo_models import sample_features
from modelfleet.oip import grpc_service_pb2 as pb
from modelfleet.oip import grpc_service_pb2_grpc
from router.oip import OFFLOAD_VALUES, _predict_request
from tests.conftest import new_prefix
from tests.fleet import REPO_ROOT, Fleet
from version_service.retention import apply_gc, plan_gc

TENANTS = {"reg": ("regression", 1), "multi": ("multiclass", 3)}
CLASSES = {"reg": 1, "multi": 3}
ENCODINGS = ("fp64", "fp32", "raw-fp64", "raw-fp32")
SERVICE = "inference.GRPCInferenceService"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def running(etcd, tmp_path_factory, artifact_checker):
    fleet = Fleet(etcd.endpoint, new_prefix(), tmp_path_factory.mktemp("oip-fleet"), checker=artifact_checker)
    for tenant, (objective, seed) in TENANTS.items():
        fleet.register(tenant, "v1", seed=seed, objective=objective)
    fleet.register("pinny", "v1", seed=11)
    fleet.register("pinny", "v2", seed=12)
    try:
        fleet.start_workers([("w1", "default"), ("w2", "default")])
        router = fleet.start_router()
        with grpc.insecure_channel(router.address) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                pytest.fail(f"the router does not serve {SERVICE}: router/server.py must register "
                            f"router.oip.InferenceServicer")
            fleet.wait_for(lambda: infer(stub, "reg", sample_features(0, 1), "fp64"), what="first ModelInfer")
            yield fleet, router, stub
    finally:
        fleet.stop()


def reference(fleet: Fleet, tenant: str, version: str, rows: np.ndarray) -> np.ndarray:
    record = fleet.registry.version(tenant, version)
    booster = lightgbm.Booster(model_file=str(fleet.store_dir / record.artifact))
    return np.asarray(booster.predict(np.asarray(rows, dtype=np.float64)))


def infer_request(tenant: str, x: np.ndarray, encoding: str, version: str = "", request_id: str = "",
                  shape: list[int] | None = None) -> pb.ModelInferRequest:
    fp32 = encoding.endswith("fp32")
    values = np.ascontiguousarray(x, dtype="<f4" if fp32 else "<f8")
    tensor = pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32" if fp32 else "FP64",
                                                   shape=list(values.shape) if shape is None else shape)
    request = pb.ModelInferRequest(model_name=tenant, model_version=version, id=request_id)
    if encoding.startswith("raw"):
        request.raw_input_contents.append(values.tobytes())
    elif fp32:
        tensor.contents.fp32_contents.extend(values.reshape(-1).tolist())
    else:
        tensor.contents.fp64_contents.extend(values.reshape(-1).tolist())
    request.inputs.append(tensor)
    return request


def infer(stub, tenant: str, x: np.ndarray, encoding: str, **kw) -> pb.ModelInferResponse:
    return stub.ModelInfer(infer_request(tenant, x, encoding, **kw), timeout=TIMEOUT)


def output_values(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[0], dtype="<f8")
    else:
        values = np.asarray(output.contents.fp64_contents, dtype=np.float64)
    return values.reshape(list(output.shape))


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- ModelInfer -------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("rows", [1, 100])
@pytest.mark.parametrize("tenant", list(TENANTS))
def test_infer_equals_lightgbm(running, tenant, rows, encoding):
    fleet, _, stub = running
    x = sample_features(rows + 3, rows)  # includes NaNs
    response = infer(stub, tenant, x, encoding)

    fp32 = encoding.endswith("fp32")
    seen = x.astype(np.float32).astype(np.float64) if fp32 else x  # what the model sees
    expected = reference(fleet, tenant, "v1", seen)
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("predict", "FP64")
    assert list(output.shape) == ([rows, 3] if CLASSES[tenant] == 3 else [rows])
    raw = encoding.startswith("raw")
    assert bool(response.raw_output_contents) == raw and bool(output.contents.fp64_contents) != raw
    np.testing.assert_allclose(output_values(response), expected, rtol=0, atol=1e-6 if fp32 else 1e-9)
    assert (response.model_name, response.model_version) == (tenant, "v1")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_large_input_converted_in_a_thread_answers_what_small_ones_do(running, encoding):
    """Over router.oip.OFFLOAD_VALUES values an input is converted off the event loop, in chunks
    (3 and a bit here): the same answers, to the bit, as its rows sent in requests under the
    threshold, converted inline."""
    fleet, _, stub = running
    small_rows = OFFLOAD_VALUES // 8  # 8 features: the largest input still converted inline
    x = sample_features(9, 3 * small_rows + 5)
    large = output_values(infer(stub, "multi", x, encoding))
    small = np.concatenate([output_values(infer(stub, "multi", x[i:i + small_rows], encoding))
                            for i in range(0, len(x), small_rows)])
    assert large.shape == (len(x), 3)
    np.testing.assert_array_equal(large, small)
    seen = x.astype(np.float32).astype(np.float64) if encoding.endswith("fp32") else x
    np.testing.assert_allclose(large, reference(fleet, "multi", "v1", seen), rtol=0, atol=1e-6)


def test_the_chunked_conversion_keeps_every_value_in_order():
    x = np.random.default_rng(3).random((2 * OFFLOAD_VALUES // 5 + 7, 5))  # 2 chunks and a partial third
    rows, predict = _predict_request(infer_request("t", x, "raw-fp64", version="v3"))
    assert (rows, predict.tenant_id, predict.version, predict.features_per_row) == (len(x), "t", "v3", 5)
    np.testing.assert_array_equal(np.asarray(predict.features), x.reshape(-1))


def test_one_dimensional_shape_is_one_row(running):
    fleet, _, stub = running
    x = sample_features(42, 1)
    response = infer(stub, "multi", x[0], "fp64")
    assert list(response.outputs[0].shape) == [1, 3]
    np.testing.assert_allclose(output_values(response), reference(fleet, "multi", "v1", x), atol=1e-9)


def test_model_version_selects_and_names_the_version_and_id_is_echoed(running):
    fleet, _, stub = running
    x = sample_features(7, 5)
    serving = infer(stub, "pinny", x, "fp64", request_id="abc-123")
    assert (serving.model_version, serving.id) == ("v2", "abc-123")
    np.testing.assert_allclose(output_values(serving), reference(fleet, "pinny", "v2", x), atol=1e-9)
    older = infer(stub, "pinny", x, "raw-fp64", version="v1")
    assert (older.model_version, older.id) == ("v1", "")
    np.testing.assert_allclose(output_values(older), reference(fleet, "pinny", "v1", x), atol=1e-9)
    assert not np.allclose(output_values(older), output_values(serving))


def test_requested_output_predict_is_accepted(running):
    _, _, stub = running
    request = infer_request("reg", sample_features(1, 2), "fp64")
    request.outputs.add(name="predict")
    assert list(stub.ModelInfer(request, timeout=TIMEOUT).outputs[0].shape) == [2]


# -- readiness and metadata -------------------------------------------------------------------
def test_server_live_ready_and_metadata(running):
    _, _, stub = running
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert metadata.name == "modelfleet" and metadata.version


@pytest.mark.parametrize("name,version,ready", [("reg", "", True), ("multi", "v1", True), ("pinny", "v1", True),
                                                ("pinny", "v2", True), ("pinny", "v999", False),
                                                ("no-such-tenant", "", False), ("no-such-tenant", "v1", False)])
def test_model_ready(running, name, version, ready):
    _, _, stub = running
    assert stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=TIMEOUT).ready is ready


@pytest.mark.parametrize("tenant", list(TENANTS))
def test_model_metadata_reports_features_classes_and_datatypes(running, tenant):
    _, _, stub = running
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=tenant), timeout=TIMEOUT)
    assert metadata.name == tenant and list(metadata.versions) == ["v1"] and metadata.platform == "lightgbm"
    assert [(t.datatype, list(t.shape)) for t in metadata.inputs] == [("FP64", [-1, 8])]
    shape = [-1, 3] if CLASSES[tenant] == 3 else [-1]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("predict", "FP64", shape)]


def test_model_metadata_lists_registered_versions(running):
    _, _, stub = running
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="pinny", version="v1"), timeout=TIMEOUT)
    assert sorted(metadata.versions) == ["v1", "v2"]


@pytest.mark.parametrize("name,version", [("no-such-tenant", ""), ("pinny", "v999")])
def test_model_metadata_of_unknown_model_or_version_is_not_found(running, name, version):
    _, _, stub = running
    err = rpc_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND and name in err.details()


def test_a_version_gc_removed_is_not_ready_at_once_and_a_new_width_is_served(running):
    """Readiness and metadata of a version follow the registry, not what the router read before;
    ModelInfer takes whatever width the version that answers takes (the worker checks it)."""
    fleet, _, stub = running
    for n in (1, 2):
        fleet.register("gcd", f"v{n}", seed=20 + n)
    fleet.wait_for(lambda: stub.ModelReady(pb.ModelReadyRequest(name="gcd"), timeout=TIMEOUT).ready,
                   what="the route to reach the router")
    assert stub.ModelReady(pb.ModelReadyRequest(name="gcd", version="v1"), timeout=TIMEOUT).ready
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="gcd", version="v1"), timeout=TIMEOUT).inputs
    apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1, tenant="gcd"))
    assert not stub.ModelReady(pb.ModelReadyRequest(name="gcd", version="v1"), timeout=TIMEOUT).ready
    err = rpc_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="gcd", version="v1"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    fleet.registry.register("gcd", "v3", fleet.model_file(23, num_features=10))
    fleet.wait_for(lambda: list(stub.ModelMetadata(pb.ModelMetadataRequest(name="gcd"), timeout=TIMEOUT)
                                .inputs[0].shape) == [-1, 10], what="v3 to serve")
    x = sample_features(23, 4, num_features=10)
    response = infer(stub, "gcd", x, "raw-fp64")
    assert response.model_version == "v3"
    np.testing.assert_allclose(output_values(response), reference(fleet, "gcd", "v3", x), atol=1e-9)
    err = rpc_error(lambda: infer(stub, "gcd", sample_features(23, 5), "fp64"))  # 5 x 8 = 40 = 4 x 10
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes 10 features per row" in err.details()


# -- bad requests -----------------------------------------------------------------------------
def _two_inputs():
    request = infer_request("reg", sample_features(1, 1), "fp64")
    request.inputs.append(request.inputs[0])
    return request


def _int32():
    request = pb.ModelInferRequest(model_name="reg")
    request.inputs.add(name="features", datatype="INT32", shape=[1, 8]).contents.int_contents.extend(range(8))
    return request


def _typed_and_raw():
    request = infer_request("reg", sample_features(1, 1), "fp64")
    request.raw_input_contents.append(np.zeros(8).tobytes())
    return request


def _unknown_output():
    request = infer_request("reg", sample_features(1, 1), "fp64")
    request.outputs.add(name="probabilities")
    return request


BAD_REQUESTS = {
    "no input": (lambda: pb.ModelInferRequest(model_name="reg"), "INVALID_ARGUMENT"),
    "two inputs": (_two_inputs, "INVALID_ARGUMENT"),
    "INT32 datatype": (_int32, "INVALID_ARGUMENT"),
    "shape larger than contents": (lambda: infer_request("reg", sample_features(1, 1), "fp64", shape=[2, 8]),
                                   "INVALID_ARGUMENT"),
    "shape smaller than fp32 contents": (lambda: infer_request("reg", sample_features(1, 2), "fp32", shape=[1, 8]),
                                         "INVALID_ARGUMENT"),
    "raw bytes do not match shape": (lambda: infer_request("reg", sample_features(1, 3), "raw-fp64", shape=[2, 8]),
                                     "INVALID_ARGUMENT"),
    "fp32 raw bytes declared FP64": (lambda: _relabelled("FP64"), "INVALID_ARGUMENT"),
    "three dimensions": (lambda: infer_request("reg", sample_features(1, 2), "fp64", shape=[1, 2, 8]),
                         "INVALID_ARGUMENT"),
    "zero rows": (lambda: infer_request("reg", np.empty((0, 8)), "fp64"), "INVALID_ARGUMENT"),
    "wrong feature count": (lambda: infer_request("reg", np.ones((2, 16)), "fp64"), "INVALID_ARGUMENT"),
    "typed and raw contents": (_typed_and_raw, "INVALID_ARGUMENT"),
    "unknown output": (_unknown_output, "INVALID_ARGUMENT"),
    "unknown model": (lambda: infer_request("no-such-tenant", sample_features(1, 1), "fp64"), "NOT_FOUND"),
    "unknown version": (lambda: infer_request("reg", sample_features(1, 1), "fp64", version="v999"), "NOT_FOUND"),
    "malformed model name": (lambda: infer_request("../etc", sample_features(1, 1), "fp64"), "INVALID_ARGUMENT"),
}


def _relabelled(datatype: str) -> pb.ModelInferRequest:
    """Raw FP32 bytes of a [2, 8] tensor declared as FP64: half the bytes the shape needs."""
    request = infer_request("reg", sample_features(1, 2), "raw-fp32")
    request.inputs[0].datatype = datatype
    return request


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_the_right_status(running, case):
    _, _, stub = running
    build, code = BAD_REQUESTS[case]
    err = rpc_error(lambda: stub.ModelInfer(build(), timeout=TIMEOUT))
    assert err.code() == getattr(grpc.StatusCode, code), (err.code(), err.details())


def test_wrong_feature_count_names_expected_and_got(running):
    _, _, stub = running
    err = rpc_error(lambda: infer(stub, "reg", np.ones((1, 5)), "fp64"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8" in err.details() and "5" in err.details() and "reg" in err.details()


# -- the service on the router ----------------------------------------------------------------
def test_health_and_reflection_name_the_inference_service(running):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    _, router, _ = running
    with grpc.insecure_channel(router.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                           timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_stock_tritonclient_in_its_own_process(running, tmp_path):
    fleet, router, _ = running
    descriptor: dict[str, list[list]] = {}

    def walk(message) -> None:
        descriptor[message.full_name] = sorted([f.name, f.number, f.type, f.is_repeated,
                                                f.message_type.full_name if f.message_type else ""]
                                               for f in message.fields)
        for nested in message.nested_types:
            walk(nested)

    for message in pb.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    tenants = {}
    for n, tenant in enumerate(TENANTS):
        rows = sample_features(100 + n, 20)
        tenants[tenant] = {"version": "v1", "num_features": 8, "num_classes": CLASSES[tenant],
                           "rows": rows.tolist(), "expected": reference(fleet, tenant, "v1", rows).tolist()}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"url": router.address, "tenants": tenants, "descriptor": descriptor}))

    done = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "tritonclient_check.py"), str(spec)],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.strip().endswith("tritonclient ok"), output
