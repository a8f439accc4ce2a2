"""Servicer stand-ins (modelfleet.servicer_wrap): what gets wrapped, what passes through.

The wrappers themselves run against real routers and workers in test_metrics, test_security
and test_tracing; this pins the selection rules those rely on."""
from __future__ import annotations

import asyncio

from modelfleet.servicer_wrap import unary_methods, wrap_methods
from modelfleet.v1 import router_admin_pb2, worker_pb2, worker_pb2_grpc


class _HalfWorker(worker_pb2_grpc.WorkerServicer):
    """Implements Predict only; Warm and Stats are the generated UNIMPLEMENTED stubs."""

    label = "half"

    async def Predict(self, request, context):
        return f"predicted {request}"


def test_unary_methods_come_from_the_service_descriptor():
    assert unary_methods(worker_pb2.DESCRIPTOR.services_by_name["Worker"]) == ["Predict", "Warm", "Stats"]
    assert unary_methods(router_admin_pb2.DESCRIPTOR.services_by_name["RouterAdmin"]) == ["Shard", "Status", "Rollout"]


def test_only_coroutine_methods_are_wrapped_and_everything_else_is_the_servicers_own():
    servicer = _HalfWorker()
    seen: list[str] = []

    def wrap(name, inner):
        async def wrapped(request, context):
            seen.append(name)
            return await inner(request, context)
        return wrapped

    stand_in = wrap_methods(servicer, unary_methods(worker_pb2.DESCRIPTOR.services_by_name["Worker"]), wrap)
    assert asyncio.run(stand_in.Predict("r", None)) == "predicted r"
    assert seen == ["Predict"]
    assert stand_in.Warm == servicer.Warm  # the generated stub, untouched: gRPC answers UNIMPLEMENTED
    assert stand_in.label == "half"
    again = wrap_methods(stand_in, ["Predict"], wrap)  # stand-ins nest (metrics around auth around tracing)
    assert asyncio.run(again.Predict("s", None)) == "predicted s"
    assert seen == ["Predict", "Predict", "Predict"]
