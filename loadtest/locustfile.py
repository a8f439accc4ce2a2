"""Locust load test of a modelfleet router over gRPC: Zipf-distributed tenants, realistic features.

Start a fleet (e.g. `make run`: a router on 127.0.0.1:50051 with demo-0001..demo-0050), then run
headless, one command:

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s \\
        --host 127.0.0.1:50051 --csv out/locust --html out/locust.html

`--host` (or LOCUST_HOST) is the router's HOST:PORT (a `grpc://` or `http://` prefix is ignored);
a headless run without one stops at once with one line saying so. Every call is
reported to locust's statistics as request type "grpc", name "Predict", with its response time
(ms), response size (bytes) and, for a failed call, the grpc.RpcError as the exception (locust
then exits non-zero with --headless). The web UI works too: drop --headless.

Each simulated user has its own gRPC channel (sync stub; grpc is patched to cooperate with
gevent, which locust runs users on) and loops: draw a tenant, send one request, repeat with no
wait. Environment:

    MODELFLEET_LOCUST_TENANTS   tenants, comma-separated; `A..B` is an inclusive numbered range
                                with the same prefix (default demo-0001..demo-0050, the demo fleet)
    MODELFLEET_LOCUST_FEATURES  features per row (default 8, the demo fleet's)
    MODELFLEET_LOCUST_ROWS      rows per request (default 1)
    MODELFLEET_LOCUST_ZIPF_S    Zipf exponent over the tenant list, first tenant hottest (default 1.1)
    MODELFLEET_LOCUST_TIMEOUT   per-call deadline in seconds (default 5)
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, constant, events, task
from locust.exception import StopUser

from modelfleet import config
from modelfleet.demo_models import sample_features
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc

grpc_gevent.init_gevent()  # before any channel exists: gRPC's I/O then yields to other users

DEFAULT_TENANTS = "demo-0001..demo-0050"
_RANGE = re.compile(r"^(?P<prefix>.*?)(?P<lo>\d+)\.\.(?P=prefix)(?P<hi>\d+)$")


def parse_tenants(spec: str) -> list[str]:
    """'a,b,t-001..t-100' -> ['a', 'b', 't-001', ..., 't-100'] (numbers keep the first one's width)."""
    tenants: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        match = _RANGE.match(item)
        if match is None:
            if ".." in item:
                raise ValueError(f"bad tenant range {item!r}: expected PREFIX0001..PREFIX0050")
            tenants.append(item)
            continue
        prefix, lo, hi = match["prefix"], match["lo"], match["hi"]
        if int(hi) < int(lo):
            raise ValueError(f"bad tenant range {item!r}: the end is before the start")
        tenants.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    if not tenants:
        raise ValueError(f"no tenants in {spec!r}")
    return tenants


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


HOST_MISSING = "give the router's address with --host HOST:PORT or LOCUST_HOST (e.g. --host 127.0.0.1:50051)"


def router_address(host: str | None) -> str:
    if not host:
        raise ValueError(HOST_MISSING)
    return re.sub(r"^[a-z][a-z0-9+.-]*://", "", host).rstrip("/")


def _setting(name: str, default: str, parse):
    """One MODELFLEET_LOCUST_* setting; a bad one stops locust with one line naming it."""
    raw = os.environ.get(name, default)
    try:
        return parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        sys.exit(f"error: {name}={raw!r}: {exc}")


TENANTS = _setting("MODELFLEET_LOCUST_TENANTS", DEFAULT_TENANTS, parse_tenants)
NUM_FEATURES = _setting("MODELFLEET_LOCUST_FEATURES", "8", config.whole(1))
ROWS = _setting("MODELFLEET_LOCUST_ROWS", "1", config.whole(1))
ZIPF_S = _setting("MODELFLEET_LOCUST_ZIPF_S", "1.1", config.number(0.0, above=True))
TIMEOUT_S = _setting("MODELFLEET_LOCUST_TIMEOUT", "5", config.number(0.0, above=True))
_CDF = np.cumsum(zipf_weights(len(TENANTS), ZIPF_S))
_FEATURE_POOL = 1024  # distinct request bodies per user, drawn at random


@events.init.add_listener
def _stop_without_a_host(environment, **_kwargs) -> None:
    """A run that starts on its own (--headless, --autostart) with no router address stops here,
    with one line, as a bad MODELFLEET_LOCUST_* setting does: otherwise every user's on_start
    fails with a traceback of its own. The web UI asks for the host in its form, and a
    --worker is told it by its master, so those go on (see PredictUser.on_start)."""
    options = environment.parsed_options
    if options is None or getattr(options, "worker", False):
        return
    if (options.headless or options.autostart) and not (environment.host or PredictUser.host):
        sys.exit(f"error: {HOST_MISSING}")


@events.test_start.add_listener
def _say_the_host_is_missing(environment, **_kwargs) -> None:
    """Once per test, not once per user, where a test starts with no host anyway (the web UI's
    form left empty): its users stop without sending anything."""
    if not (environment.host or PredictUser.host):
        logging.error(HOST_MISSING)


class PredictUser(User):
    """One caller of modelfleet.v1.Predictor/Predict with its own channel."""

    wait_time = constant(0)
    _seq = 0

    channel: grpc.Channel | None = None

    def on_start(self) -> None:
        if not self.host:  # said once by _say_the_host_is_missing; an exception here is a traceback a user
            return
        PredictUser._seq += 1
        self.rng = np.random.default_rng(PredictUser._seq)
        self.rows = sample_features(PredictUser._seq, _FEATURE_POOL * ROWS, NUM_FEATURES).reshape(_FEATURE_POOL, -1)
        self.channel = grpc.insecure_channel(router_address(self.host))
        self.stub = predictor_pb2_grpc.PredictorStub(self.channel)

    def on_stop(self) -> None:
        if self.channel is not None:
            self.channel.close()

    @task
    def predict(self) -> None:
        if self.channel is None:
            raise StopUser()  # no host: nothing to call (locust stops a user quietly on this)
        tenant = TENANTS[min(int(np.searchsorted(_CDF, self.rng.random(), side="right")), len(TENANTS) - 1)]
        request = predictor_pb2.PredictRequest(tenant_id=tenant,
                                               features=self.rows[int(self.rng.integers(_FEATURE_POOL))].tolist())
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            response = self.stub.Predict(request, timeout=TIMEOUT_S)
            length = response.ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name="Predict", response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})
