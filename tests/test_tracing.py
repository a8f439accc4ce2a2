"""OpenTelemetry tracing on real processes: one trace from the caller through router and worker.

A caller sends `traceparent`; the router's Predict continues it, its `route` and `forward` spans
are children of Predict, the worker's `predict` continues the forward span (the traceparent the
router injected), and the model `load` is a child of the predict that triggered it: a cold
request has one, a warm one has none; an Open Inference ModelInfer is one trace the same way.
Spans are read back from each process's --trace-file.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from concurrent import futures
from pathlib import Path

import grpc

from modelfleet import tracing
from modelfleet.demo_models import sample_features
from modelfleet.oip import grpc_service_pb2 as pb, grpc_service_pb2_grpc
from router.counters import RouterCounters
from router.ejection import OutlierEjector
from router.failover import Failover
from router.hedging import HedgePolicy
from tests.fleet import predict, predictor
from tests.scripted_worker import REQUEST, ScriptedFleet, err, ok


def _spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def _of(spans: list[dict], trace_id: str) -> dict[str, list[dict]]:
    named: dict[str, list[dict]] = {}
    for span in spans:
        if span["trace_id"] == trace_id:
            named.setdefault(span["name"], []).append(span)
    return named


def test_one_trace_from_the_caller_through_router_and_worker(fleet, tmp_path):
    router_file, worker_file = tmp_path / "router-spans.jsonl", tmp_path / "worker-spans.jsonl"
    fleet.register("acme", "v1", seed=1)
    fleet.start_worker("w1", extra=("--trace-file", str(worker_file)))
    router = fleet.start_router(shard_size=1, extra=("--trace-file", str(router_file)))
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]

    cold_trace, caller_span, cold_header = _traceparent()
    warm_trace, _, warm_header = _traceparent()
    oip_trace, _, oip_header = _traceparent()
    assert predict(stub, "acme", x, metadata=[("traceparent", cold_header)]).worker_id == "w1"
    assert predict(stub, "acme", x, metadata=[("traceparent", warm_header)]).worker_id == "w1"
    infer = pb.ModelInferRequest(model_name="acme", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="features", datatype="FP64", shape=[1, len(x)], contents=pb.InferTensorContents(fp64_contents=x))])
    with grpc.insecure_channel(router.address) as channel:  # the Open Inference Protocol: the same path
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer, timeout=10, metadata=[("traceparent", oip_header)])

    def all_traces_written():
        r, w = _spans(router_file), _spans(worker_file)
        done = all(len(_of(r, t).get(server, ())) == 1 and len(_of(w, t).get("predict", ())) == 1
                   for t, server in ((cold_trace, "Predict"), (warm_trace, "Predict"), (oip_trace, "ModelInfer")))
        return (r, w) if done else None

    router_spans, worker_spans = fleet.wait_for(all_traces_written, timeout=10, what="spans in the trace files")

    # The cold request: caller -> Predict -> route, forward -> predict -> load.
    r, w = _of(router_spans, cold_trace), _of(worker_spans, cold_trace)
    (server,), (route,), (forward,) = r["Predict"], r["route"], r["forward"]
    (served,), (load,) = w["predict"], w["load"]
    assert server["parent_span_id"] == caller_span and server["kind"] == "SERVER"
    assert server["service"] == "modelfleet-router" and server["instance"].startswith("router-")
    assert server["attributes"]["modelfleet.tenant"] == "acme" and server["status"] != "ERROR"
    assert route["parent_span_id"] == forward["parent_span_id"] == server["span_id"]
    assert route["attributes"]["modelfleet.tenant"] == "acme"
    assert route["attributes"]["modelfleet.version"] == "v1" and route["attributes"]["modelfleet.shard"] == ["w1"]
    assert forward["attributes"] == {"modelfleet.worker": "w1", "modelfleet.attempt": 1, "modelfleet.hedge": False,
                                     "rpc.grpc.status_code": "OK"}
    assert served["parent_span_id"] == forward["span_id"] and served["kind"] == "SERVER"
    assert served["service"] == "modelfleet-worker" and served["instance"] == "w1"
    assert {k: served["attributes"][k] for k in ("modelfleet.tenant", "modelfleet.version", "modelfleet.rows",
                                                 "modelfleet.cache")} == \
        {"modelfleet.tenant": "acme", "modelfleet.version": "v1", "modelfleet.rows": 1, "modelfleet.cache": "miss"}
    assert load["parent_span_id"] == served["span_id"]
    attrs = load["attributes"]
    assert attrs["modelfleet.bytes"] > 0 and attrs["modelfleet.artifact_bytes"] > 0
    assert 0 < attrs["modelfleet.parse_seconds"] <= attrs["modelfleet.load_seconds"]
    # Nested in time too: each child within its parent.
    for child, parent in ((route, server), (forward, server), (served, forward), (load, served)):
        assert parent["start_ns"] <= child["start_ns"] <= child["end_ns"] <= parent["end_ns"], (child, parent)

    # The warm request: the same shape, a cache hit, no load.
    r, w = _of(router_spans, warm_trace), _of(worker_spans, warm_trace)
    assert set(r) == {"Predict", "route", "forward"} and set(w) == {"predict"}
    assert w["predict"][0]["attributes"]["modelfleet.cache"] == "hit"
    assert w["predict"][0]["parent_span_id"] == r["forward"][0]["span_id"]
    # ModelInfer: one server span (its inner Predict is not a second one) over route and forward.
    r, w = _of(router_spans, oip_trace), _of(worker_spans, oip_trace)
    assert set(r) == {"ModelInfer", "route", "forward"} and set(w) == {"predict"}
    assert r["route"][0]["parent_span_id"] == r["forward"][0]["parent_span_id"] == r["ModelInfer"][0]["span_id"]
    assert w["predict"][0]["parent_span_id"] == r["forward"][0]["span_id"]
    # Health checks, metadata and admin RPCs are not traced: nothing but these three traces.
    assert {s["trace_id"] for s in router_spans + worker_spans} == {cold_trace, warm_trace, oip_trace}


def test_a_failed_request_is_one_trace_with_the_error(fleet, tmp_path):
    router_file = tmp_path / "router-spans.jsonl"
    fleet.register("acme", "v1", seed=1)
    fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1, extra=("--trace-file", str(router_file)))
    stub = predictor(router.address)
    trace_id, _, header = _traceparent()
    try:
        predict(stub, "nobody", [1.0], metadata=[("traceparent", header)])
        raise AssertionError("an unknown tenant was answered")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
    spans = fleet.wait_for(lambda: _of(_spans(router_file), trace_id).get("Predict") and _of(_spans(router_file),
                                                                                             trace_id),
                           timeout=10, what="the failed request's spans")
    (server,), (route,) = spans["Predict"], spans["route"]
    assert server["status"] == "ERROR" and server["attributes"]["rpc.grpc.status_code"] == "NOT_FOUND"
    assert "nobody" in server["description"]
    assert route["status"] == "ERROR" and route["parent_span_id"] == server["span_id"]
    assert route["attributes"] == {"modelfleet.tenant": "nobody"} and "nobody" in route["description"]
    assert route["events"] == []  # an expected error: a status, not a stack trace per request
    assert "forward" not in spans


def test_otlp_export_reaches_a_collector():
    """--otlp-endpoint: spans arrive at an OTLP/gRPC collector (an in-process fake one here)."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert tracing.setup("modelfleet-test", "t1", otlp_endpoint=f"127.0.0.1:{port}")
        with tracing.tracer().start_as_current_span("predict", attributes={"modelfleet.tenant": "acme"}):
            pass
        tracing.shutdown()  # flushes
    finally:
        tracing.shutdown()
        server.stop(None)
    spans = [(resource, span) for request in received for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert [span.name for _, span in spans] == ["predict"]
    service = {a.key: a.value.string_value for a in spans[0][0].resource.attributes}
    assert service["service.name"] == "modelfleet-test" and service["service.instance.id"] == "t1"
    assert tracing.tracer() is None


def test_forward_spans_per_attempt_failover_and_a_losing_hedge(tmp_path):
    """router.failover in-process on scripted workers (real gRPC servers with a scripted Predict,
    tests.scripted_worker): one `forward` span per attempt with its worker, place, hedge flag and
    status, each arriving at its worker as the `traceparent` of the real call's metadata."""
    path = tmp_path / "spans.jsonl"
    assert tracing.setup("modelfleet-router", "r1", trace_file=str(path))
    try:
        async def go():
            tracer = tracing.tracer()
            async with ScriptedFleet() as fleet:
                pool, workers = await fleet.start(
                    {"a": [err(0, grpc.StatusCode.UNAVAILABLE), ok(0.3, "a")], "b": [ok(0, "b")]},
                    OutlierEjector(3, 1.0, 30.0, RouterCounters()))
                with tracer.start_as_current_span("failover"):
                    assert (await Failover(pool, 32).send(REQUEST, ("a", "b"), 1.0)).worker_id == "b"
                with tracer.start_as_current_span("hedged"):  # a answers too late: b's hedge wins
                    assert (await Failover(pool, 32, HedgePolicy(20.0)).send(REQUEST, ("a", "b"), 1.0)).worker_id \
                        == "b"
                await fleet.until(lambda: len(workers["a"].calls) == 2 and workers["a"].calls[1].cancelled_early(),
                                  "the losing attempt to be cancelled at a")
                with tracer.start_as_current_span("shadowed"):  # a shadow rollout's copy, in the request's trace
                    assert (await Failover(pool, 32).send_shadow(REQUEST, "b", 1.0)).worker_id == "b"
                return workers

        workers = asyncio.run(go())
    finally:
        tracing.shutdown()
    spans = _spans(path)
    by_id = {s["span_id"]: s for s in spans}
    forwards = {(by_id[s["parent_span_id"]]["name"], s["attributes"]["modelfleet.worker"]): s
                for s in spans if s["name"] == "forward"}
    assert len(forwards) == 5

    failed, answered = forwards[("failover", "a")], forwards[("failover", "b")]
    assert failed["attributes"] == {"modelfleet.worker": "a", "modelfleet.attempt": 1, "modelfleet.hedge": False,
                                    "rpc.grpc.status_code": "UNAVAILABLE"} and failed["status"] == "ERROR"
    assert answered["attributes"]["modelfleet.attempt"] == 2 and answered["status"] != "ERROR"
    assert answered["attributes"]["rpc.grpc.status_code"] == "OK"

    loser, hedge = forwards[("hedged", "a")], forwards[("hedged", "b")]
    assert loser["attributes"]["modelfleet.outcome"] == "lost" and loser["status"] != "ERROR"
    assert loser["attributes"]["rpc.grpc.status_code"] == "CANCELLED"
    assert hedge["attributes"]["modelfleet.hedge"] is True and hedge["attributes"]["rpc.grpc.status_code"] == "OK"
    shadow = forwards[("shadowed", "b")]
    assert shadow["attributes"]["modelfleet.shadow"] is True and shadow["attributes"]["rpc.grpc.status_code"] == "OK"
    assert all("modelfleet.shadow" not in s["attributes"] for key, s in forwards.items() if key[0] != "shadowed")

    # Each attempt carried its own span as the worker's parent.
    sent = [call.metadata["traceparent"].split("-") for worker in workers.values() for call in worker.calls]
    assert len(sent) == 5
    assert all(version == "00" and int(flags, 16) & 1 for version, _, _, flags in sent)  # sampled
    assert sorted((trace_id, span_id) for _, trace_id, span_id, _ in sent) == \
        sorted((s["trace_id"], s["span_id"]) for s in forwards.values())


def test_a_sampled_out_trace_records_nothing_and_tells_the_worker_so(tmp_path):
    path = tmp_path / "spans.jsonl"
    assert tracing.setup("modelfleet-router", "r1", trace_file=str(path), sample=0.0)
    try:
        with tracing.tracer().start_as_current_span("Predict") as server:
            span, metadata = tracing.start_forward(tracing.tracer(), "w1", 1, False)
            tracing.end_forward(span, "OK")
        assert not server.is_recording() and not span.is_recording()
        _, trace_id, _, flags = dict(metadata)["traceparent"].split("-")
        assert int(flags, 16) & 1 == 0 and trace_id == f"{server.get_span_context().trace_id:032x}"
    finally:
        tracing.shutdown()
    assert _spans(path) == []
