"""What every modelfleet gRPC server shares: error translation, health, reflection, shutdown.

Front ends (router, worker) only translate: a handler raises ModelfleetError and
`translate_errors` turns it into the matching status and message. An unexpected exception is
logged with its traceback and answered INTERNAL, which therefore always means a bug.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import signal
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelfleet.errors import ModelfleetError
from modelfleet.log import event

log = logging.getLogger("modelfleet.rpc")

MAX_MESSAGE_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - (64 << 10)  # a message's features or predictions, with room for its other fields
# Clients (a router's channels to its workers) ping every KEEPALIVE_MS to find dead peers, also on
# an idle PredictStream. gRPC servers by default refuse pings without data more often than every
# 5 minutes and answer the third with GOAWAY "too_many_pings": after ~100 s idle every worker
# ended every router's stream, and the first Predict after the pause failed UNAVAILABLE on each
# member of its shard. So servers accept pings at half the clients' interval, with or without calls.
KEEPALIVE_MS = 20_000
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),  # GRPC_ARG_HTTP2_MIN_RECV_PING_..._MS
    ("grpc.keepalive_permit_without_calls", 1),
]
# How soon a client channel connects again after losing its server. gRPC's default waits 1 s, then
# 1.6 x longer after each failed attempt, up to 120 s. Measured with it: after a 20 s etcd outage
# a router followed etcd's changes ~8 s late; a worker back at its address after a restart (a
# restarted container keeps its pod's IP) got its tenants back 3-7 s after it was live. Capped at
# 1 s: ~1 s for both, for one connect attempt a second to a server that is down.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
    *RECONNECT_OPTIONS,
]


def translate_errors(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Wraps an async servicer method: ModelfleetError -> its status; anything else -> INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ModelfleetError as exc:
            await context.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("rpc.unexpected_error", extra={"mf_fields": {"method": method.__name__}})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__} (logged)")

    return wrapper


class HotMethodsServer:
    """A grpc.aio server that registers only its hot methods as "registered methods"; every
    other method is served through the generic handlers that the generated
    `add_*Servicer_to_server` adds as well.

    Why: for every call it accepts, grpc.aio's server main loop waits (asyncio.wait) on one
    pending request per registered method, adding and removing a callback on each, and the
    generated code registers every method of every service. The router had 15 (Predictor,
    RouterAdmin, Open Inference, health, reflection): one asyncio.wait over 15 tasks per Predict.
    A generic method is looked up by name when it is called, which is nothing for admin, health
    and reflection calls. Everything else is the server's own (`__getattr__`)."""

    def __init__(self, server: grpc.aio.Server, hot_methods: Iterable[str]) -> None:
        self._server = server
        self._hot = frozenset(hot_methods)  # "/package.Service/Method"

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        hot = {name: handler for name, handler in handlers.items() if f"/{service}/{name}" in self._hot}
        if hot:
            self._server.add_registered_method_handlers(service, hot)

    def __getattr__(self, name: str):
        return getattr(self._server, name)


def build_server(service_names: Iterable[str], hot_methods: Iterable[str]) -> tuple[grpc.aio.Server,
                                                                                     health.HealthServicer]:
    """An aio server with grpc.health.v1 (starting NOT_SERVING) and server reflection, where
    only `hot_methods` ("/package.Service/Method") are registered methods (HotMethodsServer).

    No interceptors: what wraps every call is registered around each servicer instead
    (modelfleet.servicer_wrap)."""
    server = HotMethodsServer(grpc.aio.server(options=SERVER_OPTIONS), hot_methods)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


async def set_serving(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


async def quiesce(handled: Callable[[], int], limit_s: float, quiet_s: float = 0.2) -> bool:
    """Waits until no call has finished for `quiet_s` (True), or `limit_s` passed (False).

    Why: a grpc.aio server's stop cancels the calls that reached it but no handler yet; their
    callers get CANCELLED, which clients do not retry. Callers that follow NOT_SERVING
    (health-checking balancers, a Service dropping the endpoint) stop sending within moments;
    what they sent meanwhile is answered here, before the stop. `handled` counts finished calls.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    seen, quiet_since = handled(), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(min(quiet_s / 4, max(0.0, deadline - loop.time())))
        now = handled()
        if now != seen:
            seen, quiet_since = now, loop.time()
        elif loop.time() - quiet_since >= quiet_s:
            return True
    return False


async def wait_for_signal() -> str:
    """Returns the name of the first SIGTERM or SIGINT received."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    name = await received
    event(log, "process.signal", signal=name)
    return name
