"""Prometheus metrics scraped from a running fleet (the exposition is parsed with prometheus_client)."""
from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet import processes
from modelfleet.metrics import INVALID_TENANT, RpcMetrics
from modelfleet.demo_models import sample_features
from modelfleet.v1 import predictor_pb2, worker_pb2, worker_pb2_grpc
from prometheus_client import CollectorRegistry
from tests.fleet import predict, predictor, stats, worker_stub


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def futures_done(calls: list, timeout: float = 30.0) -> list:
    """The gRPC futures, once every one has finished (each waits at most `timeout`)."""
    for call in calls:
        call.exception(timeout=timeout)
    return calls


def test_router_and_worker_expose_requests_cache_and_routing_metrics(fleet):
    fleet.register("a", "v1", seed=1)
    fleet.register("b", "v1", seed=2)
    worker_port, router_port = processes.free_port(), processes.free_port()
    fleet.start_worker("w1", cache_bytes=32 << 20, extra=("--metrics-port", str(worker_port)))
    router = fleet.start_router(shard_size=1, extra=("--metrics-port", str(router_port)))
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    for _ in range(5):
        predict(stub, "a", x)
    predict(stub, "b", x)
    with pytest.raises(grpc.RpcError):
        predict(stub, "a", [1.0])  # INVALID_ARGUMENT
    for malformed in ("../x", "x" * 100_000):  # INVALID_ARGUMENT; no label of their own, however long
        with pytest.raises(grpc.RpcError):
            predict(stub, malformed, x)

    w = scrape(worker_port)
    assert value(w, "modelfleet_worker_cache_events_total", kind="load") == 2
    assert value(w, "modelfleet_worker_cache_events_total", kind="hit") == 5
    assert value(w, "modelfleet_worker_models_loaded") == 2
    assert 0 < value(w, "modelfleet_worker_cache_bytes_used") <= value(w, "modelfleet_worker_cache_bytes_budget") \
        == 32 << 20
    assert value(w, "modelfleet_rpc_requests_total", component="worker", method="Predict", code="OK") == 6
    assert value(w, "modelfleet_worker_model_load_seconds_count") == 2
    assert 0 < value(w, "modelfleet_worker_model_load_seconds_sum") < 20
    assert value(w, "modelfleet_worker_cache_events_total", kind="shed") == 0
    assert ("modelfleet_worker_cache_events_total", (("kind", "negative_hit"),)) in w
    assert value(w, "modelfleet_worker_predict_streams") == 1  # the router's Predicts came as frames

    r = scrape(router_port)
    assert value(r, "modelfleet_rpc_requests_total", component="router", method="Predict", code="OK") == 6
    assert value(r, "modelfleet_rpc_requests_total", component="router", method="Predict",
                 code="INVALID_ARGUMENT") == 3
    assert value(r, "modelfleet_rpc_seconds_count", component="router", method="Predict") == 9
    assert value(r, "modelfleet_tenant_requests_total", component="router", tenant="a") == 6
    assert value(r, "modelfleet_tenant_requests_total", component="router", tenant=INVALID_TENANT) == 2
    assert not any(dict(labels).get("tenant", "").startswith(("..", "xxx")) for _, labels in r)
    assert value(r, "modelfleet_routing_tenants") == 2 and value(r, "modelfleet_routing_etcd_connected") == 1
    _, meta = fleet.client.get(fleet.keys.route("b"))
    assert value(r, "modelfleet_routing_revision") >= meta.mod_revision
    assert value(r, "modelfleet_routing_live_workers") == 1
    assert value(r, "modelfleet_router_worker_streams") == 1
    assert value(r, "modelfleet_router_workers_without_streams") == 0


def test_router_counts_calls_the_api_key_check_refuses_beside_those_it_lets_through(fleet):
    """The metrics wrapper is registered around the API-key check, so every call is counted
    once, with the code it got, refused ones included."""
    from version_service import api_keys

    fleet.register("a", "v1", seed=1)
    fleet.register("b", "v1", seed=2)
    router_port = processes.free_port()
    fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1, extra=("--auth", "1", "--metrics-port", str(router_port)))
    key_a, _ = api_keys.create(fleet.client, fleet.keys, ["a"])
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    fleet.wait_for(lambda: predict(stub, "a", x, metadata=(("x-api-key", key_a),)), timeout=5, what="the key")
    before = scrape(router_port)  # calls refused while the key was on its way are counted too
    for _ in range(3):
        predict(stub, "a", x, metadata=(("x-api-key", key_a),))
    for metadata in ((("x-api-key", key_a),), (("x-api-key", key_a),), ()):
        with pytest.raises(grpc.RpcError):
            predict(stub, "b", x, metadata=metadata)

    def added() -> dict[str, float]:
        """Calls counted since `before`, by code, and latencies observed. A refused call's status
        reaches the client as the server aborts, a moment before the count is taken: wait for it."""
        after = scrape(router_port)
        got = {code: value(after, "modelfleet_rpc_requests_total", component="router", method="Predict", code=code)
               - value(before, "modelfleet_rpc_requests_total", component="router", method="Predict", code=code)
               for code in ("OK", "PERMISSION_DENIED", "UNAUTHENTICATED")}
        got["observed"] = value(after, "modelfleet_rpc_seconds_count", component="router", method="Predict") - \
            value(before, "modelfleet_rpc_seconds_count", component="router", method="Predict")
        return got

    expected = {"OK": 3, "PERMISSION_DENIED": 2, "UNAUTHENTICATED": 1, "observed": 6}
    fleet.wait_for(lambda: added() == expected, timeout=5, what=f"the router's counts to reach {expected}")
    assert added() == expected  # and no more


def test_worker_exposes_load_latency_shed_and_negative_cache_hits(fleet):
    """The load-latency histogram, misses shed by --max-queued-loads and misses answered from a
    remembered load failure, in the metrics and in the Stats RPC, after real traffic."""
    cold = [f"cold{i}" for i in range(8)]
    model = fleet.model_file(7, num_trees=200, num_leaves=63)  # ~10 ms a load: the storm overlaps it
    for tenant in cold:
        fleet.registry.register(tenant, "v1", model)
    fleet.register("fragile", "v1", seed=77)  # its own artifact, corrupted below
    artifact = fleet.store_dir / fleet.registry.version("fragile", "v1").artifact
    artifact.write_bytes(artifact.read_bytes()[:-100] + b"garbage")
    port = processes.free_port()
    worker = fleet.start_worker("w1", extra=("--metrics-port", str(port), "--max-queued-loads", "1",
                                             "--load-threads", "1"))
    stub = worker_stub(worker.address)
    x = list(sample_features(1, 1)[0])

    storm = [stub.Predict.future(predictor_pb2.PredictRequest(tenant_id=t, version="v1", features=x), timeout=30)
             for t in cold]  # one waits for its load, the rest arrive meanwhile: beyond the bound
    codes = [f.code() for f in futures_done(storm)]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    shed = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert shed >= 1 and codes.count(grpc.StatusCode.OK) >= 1, codes
    for _ in range(2):  # the first load fails; the second request is answered from the negative cache
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(predictor_pb2.PredictRequest(tenant_id="fragile", version="v1", features=x), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:  # a caller's unknown version: no load failure of the worker's
        stub.Predict(predictor_pb2.PredictRequest(tenant_id="fragile", version="v9", features=x), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    s = stats(worker.address)
    assert s.shed_total == shed and s.negative_cache_hits_total == 1 and s.load_failures_total == 1
    w = scrape(port)
    assert value(w, "modelfleet_worker_cache_events_total", kind="shed") == shed
    assert value(w, "modelfleet_worker_cache_events_total", kind="negative_hit") == 1
    loads = value(w, "modelfleet_worker_cache_events_total", kind="load")
    assert loads == s.loads_total == len(cold) - shed
    assert value(w, "modelfleet_worker_model_load_seconds_count") == loads
    assert value(w, "modelfleet_worker_model_load_seconds_bucket", le="+Inf") == loads
    assert 0.0005 * loads < value(w, "modelfleet_worker_model_load_seconds_sum") < 10 * loads  # seconds, each


def test_a_call_its_caller_cancels_is_counted_cancelled_not_unknown():
    """UNKNOWN and INTERNAL mean a bug (modelfleet.rpc); a caller that gave up is none."""
    async def cancel_one_call() -> dict:
        entered = asyncio.Event()

        class Stuck(worker_pb2_grpc.WorkerServicer):
            async def Predict(self, request, context):
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        rpc_metrics = RpcMetrics(CollectorRegistry(), "worker")
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(
            rpc_metrics.measured(Stuck(), worker_pb2.DESCRIPTOR.services_by_name["Worker"]), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = worker_pb2_grpc.WorkerStub(channel).Predict(predictor_pb2.PredictRequest(tenant_id="acme"))
                await asyncio.wait_for(entered.wait(), 10)
                call.cancel()
            deadline = asyncio.get_running_loop().time() + 10
            while not rpc_metrics.counts and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)  # the server side hears of the cancel a moment later
        finally:
            await server.stop(0)
        return dict(rpc_metrics.counts)

    assert asyncio.run(cancel_one_call()) == {("Predict", "CANCELLED"): 1}
