"""Structured logs on real processes: `--log-format json` makes every line one JSON event, and
the success path of a request logs nothing (a line per Predict would cost more than the
prediction and drown the events that matter)."""
from __future__ import annotations

import json

import grpc
import pytest

from modelfleet.demo_models import sample_features
from tests.fleet import logged_line, predict, predictor
from worker.predictor import ROW_PREDICT

JSON_LOGS = ("--log-format", "json")


def events(log_text: str) -> list[dict]:
    """Every line of a process's log as a JSON object (fails on any line that is not one)."""
    return [json.loads(line) for line in log_text.splitlines() if line.strip()]


def test_json_logs_are_one_event_per_line_and_successes_log_nothing(fleet):
    fleet.register("a", "v1", seed=1)
    worker = fleet.start_worker("w1", extra=(*JSON_LOGS, "--event-loop", "asyncio"))  # the router: uvloop
    router = fleet.start_router(shard_size=1, extra=JSON_LOGS)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    predict(stub, "a", x)  # the one load
    for proc, serving in ((worker, "worker.serving"), (router, "router.serving")):
        logged_line(fleet, proc, serving)  # start-up's last event, then nothing more
    before = {p.name: len(events(p.log())) for p in (worker, router)}
    for _ in range(50):
        predict(stub, "a", x)
    assert {p.name: len(events(p.log())) for p in (worker, router)} == before

    with pytest.raises(grpc.RpcError):
        predict(stub, "nobody", x)  # a caller's mistake: answered, not an operator's event either
    worker_events = events(worker.log())
    serving = [e for e in worker_events if e["event"] == "worker.serving"]
    assert len(serving) == 1 and serving[0]["worker"] == "w1" and serving[0]["level"] == "info"
    # the start-up heap is out of the garbage collector's full collections (modelfleet.heap)
    router_serving = [e for e in events(router.log()) if e["event"] == "router.serving"]
    assert serving[0]["frozen_objects"] > 10_000 and router_serving[0]["frozen_objects"] > 10_000
    assert (serving[0]["event_loop"], router_serving[0]["event_loop"]) == ("asyncio", "uvloop")
    assert serving[0]["row_predict"] == ROW_PREDICT  # which single-row path predicts
    assert all({"ts", "level", "logger", "event"} <= set(e) for e in worker_events + events(router.log()))
