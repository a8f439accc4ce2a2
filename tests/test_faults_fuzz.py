"""Fuzzing Predict through a real router (and a real worker): whatever a caller sends, the answer
is a documented status, never INTERNAL or UNKNOWN, and every process is still alive afterwards.

Inputs: tenant ids and versions of every shape (known ones, unicode, slashes, dots, empty, huge),
feature arrays with NaN, +/-inf, huge and subnormal values, empty or of any length, garbage
metadata (including x-modelfleet-key and -bin keys), and messages near and over the 64 MiB
limit (built as raw bytes, so the test never holds millions of Python floats).
"""
from __future__ import annotations


from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from modelfleet.demo_models import sample_features
from modelfleet.rpc import MAX_MESSAGE_BYTES
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc, worker_pb2_grpc
from tests.conftest import new_prefix
from tests.fleet import Fleet, predict

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.UNAUTHENTICATED}
KNOWN = ["acme", "multi", "canny", "tight", "fragile"]
CLIENT_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]


@pytest.fixture(scope="module")
def running(etcd, tmp_path_factory, artifact_checker):
    fleet = Fleet(etcd.endpoint, new_prefix(), tmp_path_factory.mktemp("fuzz"), checker=artifact_checker)
    fleet.register("acme", "v1", seed=1)
    fleet.register("multi", "v1", seed=2, objective="multiclass")
    fleet.register("canny", "v1", seed=3)
    fleet.register("canny", "v2", seed=4)
    fleet.registry.start_rollout("canny", "v1", percent=50)
    fleet.register("tight", "v1", seed=5)
    fleet.registry.set_limits("tight", rate=1.0, burst=1.0, max_inflight=1)
    fleet.register("fragile", "v1", seed=6)
    artifact = fleet.store_dir / fleet.registry.version("fragile", "v1").artifact
    artifact.write_bytes(artifact.read_bytes()[:-50] + b"\x00garbage")
    workers = fleet.start_workers([("w1", "default"), ("w2", "default")])
    router = fleet.start_router(shard_size=2)
    channel = grpc.insecure_channel(router.address, options=CLIENT_OPTIONS)
    worker_channel = grpc.insecure_channel(workers[0].address, options=CLIENT_OPTIONS)
    stub = predictor_pb2_grpc.PredictorStub(channel)
    x = sample_features(1, 1)[0]
    for tenant in ("acme", "canny"):
        fleet.wait_for(lambda: predict(stub, tenant, x), what="warm-up")
    yield fleet, stub, worker_pb2_grpc.WorkerStub(worker_channel), channel
    channel.close()
    worker_channel.close()
    fleet.stop()


def _all_alive(fleet) -> None:
    dead = [(p.name, p.popen.returncode, p.log()[-2000:]) for p in fleet.procs if not p.alive()]
    assert not dead, dead


ids = st.one_of(
    st.sampled_from(KNOWN + ["v1", "v2", "v999", "", ".", "..", "a/b", "../etc", "a b", "x" * 129]),
    st.text(max_size=40),
    st.text(alphabet="abc./-_\\ \t\n\x00é漢🙂", max_size=20),
    st.builds(lambda n, c: c * n, st.integers(129, 100_000), st.sampled_from(["a", "é", "/"])),
)
doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, 0.0, -0.0]),
)
rows = st.integers(1, 40).flatmap(lambda rows: st.lists(doubles, min_size=8 * rows, max_size=8 * rows))
features = st.one_of(
    st.lists(doubles, max_size=64),
    rows, rows, rows,  # (one_of has no weights: repeating a branch makes it likelier)
    st.integers(0, 3).map(lambda k: [0.5] * (8 * 10_000 + k)),  # a big batch, and off by a few
)
_KEY = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,30}", fullmatch=True).filter(
    lambda k: not k.startswith("grpc-") and k not in ("te", "content-type", "user-agent"))
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
metadata = st.lists(st.one_of(
    st.tuples(st.sampled_from(["x-modelfleet-key", "x-modelfleet-token", "authorization", "x-modelfleet-tenant"]),
              _VALUE),
    st.tuples(_KEY, _VALUE),
    st.tuples(_KEY.map(lambda k: k + "-bin"), st.binary(max_size=200)),
), max_size=6)


SEEN: Counter = Counter()  # status -> answers, over this module's tests


def _code(call) -> grpc.StatusCode:
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        code = exc.code()
    SEEN[code.name] += 1
    return code


tenants = st.one_of(st.sampled_from(KNOWN), st.sampled_from(KNOWN), ids)
versions = st.one_of(st.just(""), st.just(""), st.sampled_from(["v1", "v2", "v999"]), ids)
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=150, deadline=None, suppress_health_check=_HEALTH)
@given(tenant=tenants, version=versions, values=features, meta=metadata)
@example(tenant="acme", version="", values=[float("nan")] * 8, meta=[("x-modelfleet-key", "")])
@example(tenant="acme", version="v1", values=[], meta=[])
@example(tenant="multi", version="", values=[1e308, -1e308, float("inf"), -float("inf")] * 2, meta=[])
@example(tenant="canny", version="", values=[0.0] * 8, meta=[("x-modelfleet-key", "\x7e" * 200)])
@example(tenant="fragile", version="", values=[0.0] * 8, meta=[])
@example(tenant="tight", version="", values=[0.0] * 8, meta=[])
@example(tenant="acme", version="v999", values=[0.0] * 8, meta=[])  # NOT_FOUND, whatever the draws
@example(tenant="é" * 100_000, version="", values=[0.0], meta=[])
def test_fuzzed_predict_through_the_router_answers_only_documented_statuses(running, tenant, version, values, meta):
    _, stub, _, _ = running
    request = predictor_pb2.PredictRequest(tenant_id=tenant, version=version, features=values)
    _code(lambda: stub.Predict(request, timeout=20, metadata=meta))


@pytest.mark.soak
@settings(max_examples=3000, deadline=None, suppress_health_check=_HEALTH)
@given(tenant=tenants, version=versions, values=features, meta=metadata)
def test_soak_fuzzed_predict_through_the_router(running, tenant, version, values, meta):
    _, stub, _, _ = running
    request = predictor_pb2.PredictRequest(tenant_id=tenant, version=version, features=values)
    _code(lambda: stub.Predict(request, timeout=20, metadata=meta))


@settings(max_examples=60, deadline=None, suppress_health_check=_HEALTH)
@given(tenant=st.one_of(st.sampled_from(KNOWN), ids), version=st.one_of(st.sampled_from(["v1", "v2"]), ids),
       values=features)
def test_fuzzed_predict_on_a_worker_answers_only_documented_statuses(running, tenant, version, values):
    _, _, worker, _ = running
    _code(lambda: worker.Predict(predictor_pb2.PredictRequest(tenant_id=tenant, version=version, features=values),
                                 timeout=20))


def _raw_request(tenant: str, n_doubles: int) -> bytes:
    """A serialised PredictRequest with n_doubles packed features, built without Python floats."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                return bytes(out)

    name = tenant.encode()
    packed = np.full(n_doubles, 0.25, dtype="<f8").tobytes()
    return b"\x0a" + varint(len(name)) + name + b"\x12" + varint(len(packed)) + packed


@pytest.mark.parametrize("size", ["just_under", "just_over"])
def test_messages_near_and_over_the_64_mib_limit(running, size):
    fleet, _, _, channel = running
    overhead = len(_raw_request("acme", 0)) + 16
    if size == "just_under":  # a whole number of 8-feature rows, leaving room for the router's version field
        n = (MAX_MESSAGE_BYTES - overhead - 1024) // 64 * 8
    else:
        n = (MAX_MESSAGE_BYTES - overhead) // 8 + 16
    raw = _raw_request("acme", n)
    assert (len(raw) < MAX_MESSAGE_BYTES) == (size == "just_under")
    call = channel.unary_unary("/modelfleet.v1.Predictor/Predict", request_serializer=lambda b: b,
                               response_deserializer=predictor_pb2.PredictResponse.FromString)
    code = _code(lambda: call(raw, timeout=60))
    del raw
    if size == "just_under":
        assert code == grpc.StatusCode.OK
    else:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _all_alive(fleet)


def test_a_batch_whose_answer_outgrows_the_limit_is_refused_before_any_work(running):
    """3 classes of 2 features: 2.9M rows are a 46 MB request and a 70 MB answer. The worker
    refuses it up front, naming the most rows it can answer, instead of predicting for seconds
    (other tenants waiting) and then failing to send."""
    fleet, stub, _, channel = running
    fleet.registry.register("wide", "v1", fleet.model_file(31, "multiclass", num_features=2))
    fleet.wait_for(lambda: predict(stub, "wide", [0.5, 0.5]), what="the tenant to serve")
    call = channel.unary_unary("/modelfleet.v1.Predictor/Predict", request_serializer=lambda b: b,
                               response_deserializer=predictor_pb2.PredictResponse.FromString)
    raw = _raw_request("wide", 2 * 2_900_000)
    with pytest.raises(grpc.RpcError) as refused:
        call(raw, timeout=60)
    del raw
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 per row" in refused.value.details() and "send at most 2793472 rows" in refused.value.details()
    assert predict(stub, "wide", [0.5, 0.5]).model_version == "v1"
    _all_alive(fleet)


def test_everything_still_alive_and_serving_after_the_fuzzing(running):
    fleet, stub, _, _ = running
    _all_alive(fleet)
    print(f"fuzzing answers by status: {dict(SEEN)}")
    if sum(SEEN.values()) >= 150:  # the fuzz tests ran in this session: they reached the interesting answers
        assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"} <= set(SEEN)
    assert predict(stub, "acme", sample_features(2, 1)[0]).model_version == "v1"


