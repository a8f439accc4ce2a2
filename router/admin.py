"""RouterAdmin: what this router believes right now (its shards, its routing revision)."""
from __future__ import annotations

import time

import grpc

from modelfleet.errors import NotFound
from modelfleet.rpc import translate_errors
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc
from sharding import ShardCache
from version_service.routing_cache import RoutingCache
from version_service.schema import validate_id


class RouterAdminServicer(router_admin_pb2_grpc.RouterAdminServicer):
    def __init__(self, routes: RoutingCache, shards: ShardCache, default_shard_size: int) -> None:
        self.routes = routes
        self.shards = shards
        self.default_shard_size = default_shard_size

    @translate_errors
    async def Shard(self, request: router_admin_pb2.ShardRequest, context: grpc.aio.ServicerContext):
        tenant = validate_id("tenant id", request.tenant_id)
        route = self.routes.route(tenant)
        if route is None:
            raise NotFound(f"unknown tenant {tenant!r}: no model registered")
        k = route.shard_size or self.default_shard_size
        return router_admin_pb2.ShardResponse(tenant_id=tenant, workers=self.shards.get(tenant, k), shard_size=k,
                                              serving_version=route.serving, revision=self.routes.revision)

    @translate_errors
    async def Status(self, request: router_admin_pb2.RouterStatusRequest, context: grpc.aio.ServicerContext):
        return router_admin_pb2.RouterStatusResponse(
            revision=self.routes.revision, tenants=len(self.routes.routes), workers=len(self.routes.workers),
            live_workers=len(self.shards.members), etcd_connected=self.routes.connected,
            seconds_since_change=time.monotonic() - self.routes.last_change, resyncs=self.routes.resyncs)
