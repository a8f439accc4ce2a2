"""RouterAdmin: what this router believes right now (its shards, its routing revision)."""
from __future__ import annotations

import time

import grpc

from modelfleet.errors import NotFound
from modelfleet.rpc import translate_errors
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc
from router.rollout import Rollouts, rollout_of
from sharding import ShardCache
from version_service.routing_cache import RoutingCache
from version_service.schema import validate_id


class RouterAdminServicer(router_admin_pb2_grpc.RouterAdminServicer):
    def __init__(self, router_id: str, routes: RoutingCache, shards: ShardCache, default_shard_size: int,
                 rollouts: Rollouts) -> None:
        self.router_id = router_id
        self.routes = routes
        self.shards = shards
        self.default_shard_size = default_shard_size
        self.rollouts = rollouts

    def _route(self, tenant_id: str):
        tenant = validate_id("tenant id", tenant_id)
        route = self.routes.route(tenant)
        if route is None:
            raise NotFound(f"unknown tenant {tenant!r}: no model registered")
        return tenant, route

    @translate_errors
    async def Shard(self, request: router_admin_pb2.ShardRequest, context: grpc.aio.ServicerContext):
        tenant, route = self._route(request.tenant_id)
        k = route.shard_size or self.default_shard_size
        return router_admin_pb2.ShardResponse(tenant_id=tenant, workers=self.shards.get(tenant, k), shard_size=k,
                                              serving_version=route.serving, revision=self.routes.revision)

    @translate_errors
    async def Status(self, request: router_admin_pb2.RouterStatusRequest, context: grpc.aio.ServicerContext):
        return router_admin_pb2.RouterStatusResponse(
            revision=self.routes.revision, tenants=len(self.routes.routes), workers=len(self.routes.workers),
            live_workers=len(self.shards.members), etcd_connected=self.routes.connected,
            seconds_since_change=time.monotonic() - self.routes.last_change, resyncs=self.routes.resyncs,
            router_id=self.router_id)

    @translate_errors
    async def Rollout(self, request: router_admin_pb2.RolloutStatusRequest, context: grpc.aio.ServicerContext):
        # The revision before the route: the route is then at least as new as the revision says,
        # so a tool comparing it with etcd never takes a lagging view for a current one.
        revision = self.routes.revision
        tenant, route = self._route(request.tenant_id)
        response = router_admin_pb2.RolloutStatusResponse(
            tenant_id=tenant, router_id=self.router_id, serving_version=route.serving,
            canary_version=route.canary or "", canary_percent=route.canary_percent or 0.0,
            shadow_version=route.shadow or "", rollout_id=route.rollout_id or "", revision=revision)
        stats = self.rollouts.stats.get(tenant)
        if stats is not None and stats.rollout == rollout_of(route):
            response.serving_requests = stats.serving_requests
            response.canary_requests = stats.canary_requests
            response.serving_errors = stats.serving_errors
            response.canary_errors = stats.canary_errors
            response.shadow_requests = stats.shadow_requests
            response.shadow_errors = stats.shadow_errors
            response.shadow_dropped = stats.shadow_dropped
            response.shadow_max_abs_diff = stats.diff_max
            response.shadow_mean_abs_diff = stats.diff_sum / stats.diff_count if stats.diff_count else 0.0
            response.shadow_latency_ms.extend(stats.latencies_ms)
        return response
