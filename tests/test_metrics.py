"""Prometheus metrics scraped from a running fleet (the exposition is parsed with prometheus_client)."""
from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet import processes
from modelfleet.demo_models import sample_features
from tests.fleet import predict, predictor


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


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

    w = scrape(worker_port)
    assert value(w, "modelfleet_worker_cache_events_total", kind="load") == 2
    assert value(w, "modelfleet_worker_cache_events_total", kind="hit") == 5
    assert value(w, "modelfleet_worker_models_loaded") == 2
    assert 0 < value(w, "modelfleet_worker_cache_bytes_used") <= value(w, "modelfleet_worker_cache_bytes_budget") \
        == 32 << 20
    assert value(w, "modelfleet_rpc_requests_total", component="worker", method="Predict", code="OK") == 6

    r = scrape(router_port)
    assert value(r, "modelfleet_rpc_requests_total", component="router", method="Predict", code="OK") == 6
    assert value(r, "modelfleet_rpc_requests_total", component="router", method="Predict",
                 code="INVALID_ARGUMENT") == 1
    assert value(r, "modelfleet_rpc_seconds_count", component="router", method="Predict") == 7
    assert value(r, "modelfleet_tenant_requests_total", component="router", tenant="a") == 6
    assert value(r, "modelfleet_routing_tenants") == 2 and value(r, "modelfleet_routing_etcd_connected") == 1
    _, meta = fleet.client.get(fleet.keys.route("b"))
    assert value(r, "modelfleet_routing_revision") >= meta.mod_revision
    assert value(r, "modelfleet_routing_live_workers") == 1
