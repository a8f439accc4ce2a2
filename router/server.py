"""`modelfleet router`: a stateless Predict router. Run as many as you like on one etcd.

Start: load the routing cache (one ranged read), open channels to live workers, listen, report
SERVING. Membership changes arrive on the watch thread and are applied on the event loop, so
the request path reads plain dicts without locks. SIGTERM: NOT_SERVING, leave membership, keep
answering until callers have gone quiet (`--drain-seconds` at most), let in-flight requests
finish, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time

from modelfleet import allocator, event_loop, heap
from modelfleet.log import event
from modelfleet.rpc import build_server, quiesce, set_serving, wait_for_signal
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc, router_admin_pb2, router_admin_pb2_grpc
from modelfleet.errors import Unavailable
from modelfleet.oip import grpc_service_pb2_grpc
from router.admin import RouterAdminServicer
from router.oip import SERVICE as OIP_SERVICE, InferenceServicer
from router.rollout import Rollouts
from router.servicer import PredictorServicer
from router.settings import ResilienceSettings
from router.worker_pool import WorkerPool
from sharding import ShardCache
from prometheus_client import CollectorRegistry
from google.protobuf.descriptor import ServiceDescriptor

from modelfleet import metrics, tls, tracing
from router.auth import ApiKeyCheck
from version_service.etcd_client import connect_args, etcd_access
from version_service.membership import LeasedRegistration
from version_service.registry import Registry
from version_service.routing_cache import RoutingCache
from version_service.schema import Keys, RouterRecord, started_stamp, validate_id

log = logging.getLogger("modelfleet.router")

SERVICE = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"]
ADMIN_SERVICE = router_admin_pb2.DESCRIPTOR.services_by_name["RouterAdmin"]
SERVICE_NAMES = [service.full_name for service in (SERVICE, ADMIN_SERVICE, OIP_SERVICE)]
HOT_METHODS = (f"/{SERVICE.full_name}/Predict", f"/{OIP_SERVICE.full_name}/ModelInfer")  # rpc.HotMethodsServer


class Membership:
    """Keeps the shard cache and the worker pool in step with the routing cache's workers."""

    def __init__(self, routes: RoutingCache, shards: ShardCache, pool: WorkerPool) -> None:
        self.routes, self.shards, self.pool = routes, shards, pool
        self._loop = asyncio.get_running_loop()

    def on_change(self, kind: str) -> None:  # watch thread
        if kind == "workers":
            self._loop.call_soon_threadsafe(self.apply)

    def apply(self) -> None:  # event loop
        workers = dict(self.routes.workers)
        live = self.routes.live_members()
        self.shards.set_members(live)
        for channel in self.pool.update(workers):
            self._loop.create_task(channel.close(grace=15))  # > a worker's shutdown grace
        event(log, "router.membership", live=len(live), workers=len(workers))


def _export_router_metrics(registry: CollectorRegistry, routes: RoutingCache, shards: ShardCache,
                           servicer: PredictorServicer, pool: WorkerPool) -> None:
    """Failover, shedding, routing-cache and worker-stream state, read at scrape time."""
    counters = getattr(servicer, "counters", None)
    if counters is not None:
        metrics.counters(registry, "modelfleet_router_events", "retries, hedges, ejections, shed requests, ...",
                         counters.snapshot)
    metrics.gauges(registry, lambda: {
        "modelfleet_routing_revision": ("etcd revision of the newest change applied", routes.revision),
        "modelfleet_routing_staleness_seconds": ("seconds since the routing cache last changed",
                                                 time.monotonic() - routes.last_change),
        "modelfleet_routing_etcd_connected": ("1 while the etcd watch is connected", int(routes.connected)),
        "modelfleet_routing_tenants": ("tenants in the routing cache", len(routes.routes)),
        "modelfleet_routing_live_workers": ("workers shards are computed over", len(shards.members)),
        "modelfleet_router_worker_streams": ("workers this router has a PredictStream open to",
                                             sum(p.streaming for p in list(pool.predictors.values()))),
        "modelfleet_router_workers_without_streams": (
            "workers sent unary Predicts because they answered PredictStream UNIMPLEMENTED (older ones)",
            sum(p.without_streams for p in list(pool.predictors.values()))),
    })


async def serve(args: argparse.Namespace) -> None:
    if args.shard_size < 1:
        raise SystemExit("error: --shard-size must be at least 1")
    server_credentials = tls.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    routes = RoutingCache(args.etcd, Keys(args.prefix), **etcd_access(args))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, routes.start)
    shards = ShardCache()
    pool = WorkerPool(credentials=tls.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key),
                      transport=args.worker_transport)
    membership = Membership(routes, shards, pool)
    routes.add_listener(membership.on_change)
    membership.apply()

    registry = CollectorRegistry()
    rpc_metrics = metrics.RpcMetrics(registry, "router")
    key_check = ApiKeyCheck(lambda: routes.api_keys) if args.auth else None

    def guarded(servicer, service: ServiceDescriptor):
        """Metrics outermost, so calls the key check refuses are counted too."""
        if key_check is not None:
            servicer = key_check.checked(servicer, service)
        return rpc_metrics.measured(servicer, service)

    server, health = build_server(SERVICE_NAMES, HOT_METHODS)
    port = tls.listen(server, f"{args.host}:{args.port}", server_credentials)
    router_id = args.router_id or f"router-{socket.gethostname()}-{port}"
    validate_id("router id", router_id)
    tracing.setup_from_args(args, "modelfleet-router", router_id)  # before the servicers read tracing.tracer()
    rollouts = Rollouts(args.shadow_budget, routes.route)
    rollouts.start()
    servicer = PredictorServicer(routes, shards, pool, args.shard_size, args.spill_inflight, args.default_deadline,
                                 rollouts, settings=ResilienceSettings.from_args(args))
    predictor_pb2_grpc.add_PredictorServicer_to_server(
        guarded(tracing.traced(servicer, {"Predict": "Predict"}), SERVICE), server)
    _export_router_metrics(registry, routes, shards, servicer, pool)
    metrics_port = metrics.serve(registry, args.host, args.metrics_port)
    router_admin_pb2_grpc.add_RouterAdminServicer_to_server(
        guarded(RouterAdminServicer(router_id, routes, shards, args.shard_size, rollouts), ADMIN_SERVICE), server)
    client = connect_args(args)
    keys = Keys(args.prefix)
    registry = Registry(client, keys)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(guarded(tracing.traced(
        InferenceServicer(servicer, routes, registry.version, registry.versions), {"ModelInfer": "ModelInfer"}),
        OIP_SERVICE), server)
    await server.start()
    try:
        record = RouterRecord(router_id=router_id, address=f"{args.advertise_host}:{port}",
                              started=started_stamp(), shard_size=args.shard_size)
        registration = LeasedRegistration(client, keys.router(router_id), record, ttl=args.lease_ttl)
        try:  # admin tools find routers here; serving does not depend on it
            await loop.run_in_executor(None, registration.start)
        except Unavailable as exc:
            event(log, "router.register_failed", level=logging.WARNING, error=str(exc))
    except BaseException:  # a refused setting: the started server goes before the loop does
        await server.stop(0)
        raise
    frozen = heap.freeze_startup_heap()  # the routing cache is loaded: what starting made stays
    await set_serving(health, SERVICE_NAMES, True)
    event(log, "router.serving", router=router_id, address=f"{args.host}:{port}", metrics_port=metrics_port,
          auth=args.auth, frozen_objects=frozen, event_loop=event_loop.running_loop_name(),
          allocator=allocator.active(),
          tls="mutual" if args.tls_client_ca else bool(server_credentials), tenants=len(routes.routes),
          workers=len(routes.workers), revision=routes.revision)

    await wait_for_signal()
    await set_serving(health, SERVICE_NAMES, False)
    await loop.run_in_executor(None, registration.stop)
    quiet = await quiesce(lambda: sum(rpc_metrics.counts.values()), args.drain_seconds)
    event(log, "router.drained", router=router_id, quiet=quiet)
    await server.stop(grace=10)
    await rollouts.close()
    routes.stop()
    await pool.close()
    client.close()
    tracing.shutdown()
    event(log, "router.stopped", router=router_id)
