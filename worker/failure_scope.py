"""UNAVAILABLE about one model, not about the worker that says it.

A worker answers UNAVAILABLE when it cannot load a model because what the load needs (the model
store, etcd) is unreachable, and gRPC answers UNAVAILABLE for a worker that is gone. Routers eject
a worker that keeps failing: right for the second, wrong for the first, which would take a
healthy worker away from every tenant it serves (and their warm models) for one model's trouble.
The first kind carries trailing metadata `x-modelfleet-failure: model`: the router tries the next
member, which may hold the model or reach the store, without counting it against the worker.
"""
from __future__ import annotations

import grpc

FAILURE_KEY = "x-modelfleet-failure"
MODEL = "model"


def mark_model_failure(context: grpc.aio.ServicerContext) -> None:
    """Says that the error that follows is about the model asked for (kept by the abort)."""
    context.set_trailing_metadata(((FAILURE_KEY, MODEL),))


def is_model_failure(metadata) -> bool:
    """Whether a call's trailing metadata says its error was about the model, not the worker."""
    return any(key == FAILURE_KEY and value == MODEL for key, value in metadata or ())
