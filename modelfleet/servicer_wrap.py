"""Wrapping a servicer's RPC methods once, at registration, instead of in a server interceptor.

Why not an interceptor: grpc.aio runs its interceptors as a chain of coroutines on every call,
before the handler, and an interceptor that wraps the handler builds the wrapper per call or
looks it up. With the metrics interceptor the router's hop cost ~25 µs of CPU per request more
than with none, ~5 µs of it for a pass-through interceptor's machinery alone (`python -m
loadtest.bench` warm cells, 2 cores). A stand-in registered in the servicer's place has its
methods wrapped already: the generated `add_*Servicer_to_server` reads each method once, so a
call costs one more await and nothing else, and methods left unwrapped cost nothing. Calls one
servicer makes to another (the OIP ModelInfer calling Predict) go to the real servicer, so they
are not counted, checked or traced twice.
"""
from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Iterable, Mapping

from google.protobuf.descriptor import ServiceDescriptor

UnaryMethod = Callable[[Any, Any], Awaitable[Any]]  # (request, context) -> response


class ServicerStandIn:
    """Registered in place of a servicer: the wrapped methods, and every other attribute the
    servicer's own."""

    def __init__(self, servicer: Any, methods: Mapping[str, UnaryMethod]) -> None:
        self._servicer = servicer
        self.__dict__.update(methods)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._servicer, name)


def unary_methods(service: ServiceDescriptor) -> list[str]:
    """The unary-unary methods of a service (`*_pb2.DESCRIPTOR.services_by_name[...]`)."""
    return [m.name for m in service.methods if not (m.client_streaming or m.server_streaming)]


def wrap_methods(servicer: Any, methods: Iterable[str], wrap: Callable[[str, UnaryMethod], UnaryMethod]) -> Any:
    """A stand-in whose `methods` are `wrap(name, the servicer's method)`.

    Methods the servicer does not implement as coroutines (the generated base class's
    UNIMPLEMENTED stubs) are left as they are: gRPC answers them UNIMPLEMENTED either way."""
    wrapped = {}
    for name in methods:
        inner = getattr(servicer, name)
        if inspect.iscoroutinefunction(inner):
            wrapped[name] = wrap(name, inner)
    return ServicerStandIn(servicer, wrapped)
