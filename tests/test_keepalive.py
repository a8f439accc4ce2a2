"""Keepalive between routers and workers: an idle fleet keeps its streams and answers the next
Predict. gRPC servers by default answer a client's third early ping with GOAWAY
"too_many_pings" (modelfleet.rpc.SERVER_OPTIONS says why that failed requests)."""
from __future__ import annotations

import time

import pytest

from modelfleet import rpc
from tests.fleet import predict, serve_and_warm


def test_servers_accept_the_pings_their_clients_send():
    server, client = dict(rpc.SERVER_OPTIONS), dict(rpc.CHANNEL_OPTIONS)
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1


@pytest.mark.soak
def test_an_idle_fleet_answers_the_first_predict_after_two_minutes(fleet):
    tenants = [f"t{i}" for i in range(4)]
    for i, tenant in enumerate(tenants):
        fleet.register(tenant, "v1", seed=i)
    workers, router, stub, x = serve_and_warm(fleet, tenants)
    idle_until = time.monotonic() + 130  # gRPC's defaults ended the streams after ~100 s
    fleet.wait_for(lambda: time.monotonic() >= idle_until, timeout=200, what="two idle minutes")
    for tenant in tenants:
        assert predict(stub, tenant, x, timeout=5).model_version == "v1"  # raises on UNAVAILABLE
    for proc in (*workers, router):
        assert "too_many_pings" not in proc.log()
