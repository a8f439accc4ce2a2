"""The router's Predict, readable top to bottom: route -> quota -> version -> shard -> forward.

1. the tenant's route from the watch-fed cache (no etcd per request);
2. the tenant's quota (router.quotas): over its rate or in-flight limit -> RESOURCE_EXHAUSTED
   with `retry-after-ms`, before any worker spends time on it;
3. the version: the caller's, else the canary's share of a rollout, else the serving one;
4. its shuffle shard over live, non-draining workers (cached per tenant);
5. forward (router.failover): members in order (affinity, spill, ejected workers last), the next
   one on a dead or hung member or after the hedge delay, all within the caller's deadline; for
   the serving version, with its artifact digest from the route (worker.artifact_hint), so a
   worker that has to load the model reads nothing from etcd.
   Errors about the request itself (unknown version, bad features, corrupt artifact) come back
   from the worker and are returned as they are: another member would answer the same.
6. a shadow rollout gets a copy afterwards, off the caller's path, on the shard's first member only.

With tracing on (modelfleet.tracing), steps 1-4 are the `route` span and each attempt of step 5
a `forward` span; with it off the path tests `self.tracer is None` and nothing else.
"""
from __future__ import annotations

import grpc

from modelfleet import tracing
from modelfleet.errors import NotFound, Unavailable
from modelfleet.rpc import translate_errors
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from router.counters import RouterCounters
from router.ejection import OutlierEjector
from router.failover import Failover
from router.hedging import HedgePolicy
from router.quotas import TenantQuotas
from router.rollout import Rollouts, RolloutStats, in_canary, routing_key
from router.settings import ResilienceSettings
from router.worker_pool import WorkerPool
from sharding import ShardCache
from version_service.routing_cache import RoutingCache
from version_service.schema import RouteRecord, validate_id
from worker.overload import RetryLater, set_retry_hint

SHADOW_TIMEOUT_S = 2.0


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, routes: RoutingCache, shards: ShardCache, pool: WorkerPool, default_shard_size: int,
                 spill_inflight: int, default_deadline: float, rollouts: Rollouts,
                 settings: ResilienceSettings | None = None) -> None:
        """settings None: from the MODELFLEET_* environment, else the defaults (everything on)."""
        settings = settings if settings is not None else ResilienceSettings.from_args(None)
        self.routes = routes
        self.shards = shards
        self.pool = pool
        self.default_shard_size = default_shard_size
        self.spill_inflight = spill_inflight
        self.default_deadline = default_deadline
        self.rollouts = rollouts
        self.settings = settings
        self.counters = RouterCounters()
        # The pool owns per-worker state; its ejector follows these settings and counts here.
        pool.ejector = OutlierEjector(settings.eject_after_failures, settings.eject_backoff_s,
                                      settings.eject_max_backoff_s, self.counters)
        self.failover = Failover(pool, spill_inflight, HedgePolicy(settings.hedge_after_ms), self.counters)
        self.quotas = TenantQuotas(settings.tenant_rate_limit, settings.tenant_burst, settings.tenant_max_inflight,
                                   self.counters)
        self.tracer = tracing.tracer()  # None while tracing is off: the only cost is one test

    @translate_errors
    async def Predict(self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        tenant = request.tenant_id
        tracer = self.tracer
        if tracer is None:
            route, stats, shard = self._route(request, context)
        else:  # the `route` span: a child of the server span the tracing interceptor opened
            with tracer.start_as_current_span("route", attributes={"modelfleet.tenant": tenant},
                                              record_exception=False) as span:  # its status says why
                route, stats, shard = self._route(request, context)
                tracing.set_attributes(span, {"version": request.version, "shard": shard})
        try:
            remaining = context.time_remaining()
            artifact = route.serving_sha256 if request.version == route.serving else route.artifact_of(request.version)
            try:
                response = await self.failover.send(request, shard,
                                                    remaining if remaining is not None else self.default_deadline,
                                                    artifact=artifact)
            except RetryLater as exc:  # every member overloaded: pass the workers' hint on
                set_retry_hint(context, exc)
                raise
            except Exception:
                if stats is not None:  # the rollout's books: which version failed this request
                    if request.version == route.canary:
                        stats.canary_errors += 1
                    else:
                        stats.serving_errors += 1
                raise
            if stats is not None and route.shadow is not None and request.version == route.serving:
                # One member, the shard's first, with the whole budget, outside the shard's books:
                # a slow shadow (a big model's first load) never counts against the worker (three
                # would eject it from every shard), nor goes on to load on the next member.
                self.rollouts.shadow(stats, request, response,
                                     lambda r: self.failover.send_shadow(r, shard[0], SHADOW_TIMEOUT_S,
                                                                         artifact=route.shadow_sha256))
            return response
        finally:
            self.quotas.release(tenant)

    def _route(self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext
               ) -> tuple[RouteRecord, RolloutStats | None, tuple[str, ...]]:
        """Steps 1-4: (route, rollout stats or None, shard), with request.version resolved.

        Admits the request against the tenant's quota; on success the caller owes one
        `quotas.release(tenant)`, on any error this has released already.
        """
        tenant = request.tenant_id
        route = self.routes.route(tenant)
        if route is None:
            validate_id("tenant id", tenant)
            raise NotFound(f"unknown tenant {tenant!r}: no model registered")
        try:
            self.quotas.admit(tenant, route)
        except RetryLater as exc:
            set_retry_hint(context, exc)
            raise
        try:
            stats = None
            if request.version:
                validate_id("version", request.version)
            elif route.canary is None and route.shadow is None:
                request.version = route.serving
            else:
                stats = self.rollouts.stats_for(tenant, route)
                if route.canary is not None and in_canary(tenant, route.canary_percent or 0.0, routing_key(context)):
                    request.version = route.canary
                    stats.canary_requests += 1
                else:
                    request.version = route.serving
                    stats.serving_requests += 1
            shard = self.shards.get(tenant, route.shard_size or self.default_shard_size)
            if not shard:
                raise Unavailable("no live workers in the fleet")
        except BaseException:
            self.quotas.release(tenant)
            raise
        return route, stats, shard
