"""Graceful shutdown on real processes: requests in flight when SIGTERM arrives still succeed.

A worker on SIGTERM leaves membership first (routers stop sending), finishes what it has, exits 0.
A router on SIGTERM reports NOT_SERVING, answers until its callers go quiet, stops accepting,
lets in-flight requests finish, exits 0.
"In flight" is observed, not assumed: the worker's cache-hit counter moves when a request has
reached the model, and a 20k-row batch on a 300-tree model then takes most of a second to predict
(well inside the 5 s for which a router keeps the channel to a departed worker open).
"""
from __future__ import annotations

import signal
import threading
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelfleet.demo_models import sample_features
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from tests.fleet import predict, predictor, stats
from version_service.membership import list_workers

ROWS = 20_000


def _heavy_fleet(fleet, workers: int):
    fleet.register("heavy", "v1", seed=7, num_trees=300, num_leaves=63)
    procs = {p.name: p for p in fleet.start_workers([(f"w{n}", "default") for n in range(1, workers + 1)])}
    router = fleet.start_router(shard_size=workers)
    stub = predictor(router.address)
    first = fleet.wait_for(lambda: predict(stub, "heavy", sample_features(1, 1)[0], timeout=30),
                           what="the model to load").worker_id
    return procs, router, stub, first


def _start_slow_batches(stub, worker_address: str, n: int):
    """n slow batches via the router; returns their futures once all have reached the model."""
    before = stats(worker_address).hits_total
    request = predictor_pb2.PredictRequest(tenant_id="heavy", features=sample_features(3, ROWS).reshape(-1))
    futures = [stub.Predict.future(request, timeout=60) for _ in range(n)]
    return futures, before


def test_worker_sigterm_finishes_the_batches_in_flight_and_exits_0(fleet):
    procs, router, stub, first = _heavy_fleet(fleet, workers=2)
    other = "w2" if first == "w1" else "w1"
    futures, before = _start_slow_batches(stub, procs[first].address, 2)
    fleet.wait_for(lambda: stats(procs[first].address).hits_total >= before + 2, timeout=30,
                   what="both batches to reach the model")
    assert not any(f.done() for f in futures), "the batches finished before SIGTERM: make them slower"
    procs[first].signal(signal.SIGTERM)

    answers = [f.result() for f in futures]  # raises if any failed
    assert [a.worker_id for a in answers] == [first, first]
    assert all(len(a.predictions) == ROWS for a in answers)
    assert procs[first].popen.wait(30) == 0
    assert [w.worker_id for w in list_workers(fleet.client, fleet.keys)] == [other]
    assert predict(stub, "heavy", sample_features(1, 1)[0], timeout=30).worker_id == other


def test_router_sigterm_finishes_the_requests_in_flight_and_exits_0(fleet):
    procs, router, stub, first = _heavy_fleet(fleet, workers=1)
    futures, before = _start_slow_batches(stub, procs[first].address, 2)
    fleet.wait_for(lambda: stats(procs[first].address).hits_total >= before + 2, timeout=30,
                   what="both batches to reach the model")
    assert not any(f.done() for f in futures), "the batches finished before SIGTERM: make them slower"
    router.signal(signal.SIGTERM)

    answers = [f.result() for f in futures]
    assert all(len(a.predictions) == ROWS and a.worker_id == first for a in answers)
    assert router.popen.wait(30) == 0
    with grpc.insecure_channel(router.address) as channel:  # and it is gone: nothing accepts any more
        try:
            predictor_pb2_grpc.PredictorStub(channel).Predict(
                predictor_pb2.PredictRequest(tenant_id="heavy", features=[0.0] * 8), timeout=2)
            raise AssertionError("a stopped router answered")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE


def test_router_sigterm_loses_no_call_of_callers_that_follow_not_serving(fleet):
    """Callers that stop sending once the router reports NOT_SERVING, as a health-checking balancer
    does, get every call answered. grpc.aio's stop cancels calls that reached the router but no
    handler yet, so the router first answers until its callers have gone quiet."""
    fleet.register("t", "v1", seed=1)
    fleet.start_worker("w1")
    router = fleet.start_router()
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    fleet.wait_for(lambda: predict(stub, "t", x, timeout=10), what="the model to load")
    leaving = threading.Event()
    outcomes: list[str] = []

    def follow_health() -> None:
        try:
            with grpc.insecure_channel(router.address) as channel:
                for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
        except grpc.RpcError:
            pass
        leaving.set()

    def call_until_leaving() -> None:
        while not leaving.is_set():
            try:
                predict(stub, "t", x, timeout=10)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    threads = [threading.Thread(target=follow_health)] + [threading.Thread(target=call_until_leaving)
                                                          for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        fleet.wait_for(lambda: len(outcomes) >= 200, timeout=60, what="steady traffic")
        router.signal(signal.SIGTERM)
        assert router.popen.wait(30) == 0
    finally:
        leaving.set()
        for thread in threads:
            thread.join(30)
    assert set(outcomes) == {"OK"}, Counter(outcomes)
