"""The router's Predict, readable top to bottom: route -> shard -> member -> forward.

1. the tenant's route from the watch-fed cache (no etcd per request);
2. its shuffle shard over live, non-draining workers (cached per tenant);
3. the member order: affinity to the first member, spill when it is busy;
4. forward with the caller's remaining deadline; on UNAVAILABLE (a dead or leaving worker)
   try the next member while the deadline allows. Errors about the request itself (unknown
   version, bad features, corrupt artifact) come back from the worker and are returned as they
   are: another member would answer the same.
"""
from __future__ import annotations

import time

import grpc

from modelfleet.errors import DeadlineExceeded, NotFound, Unavailable
from modelfleet.rpc import translate_errors
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from router.worker_pool import WorkerPool
from sharding import ShardCache
from version_service.routing_cache import RoutingCache
from version_service.schema import validate_id

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, routes: RoutingCache, shards: ShardCache, pool: WorkerPool, default_shard_size: int,
                 spill_inflight: int, default_deadline: float) -> None:
        self.routes = routes
        self.shards = shards
        self.pool = pool
        self.default_shard_size = default_shard_size
        self.spill_inflight = spill_inflight
        self.default_deadline = default_deadline

    @translate_errors
    async def Predict(self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        tenant = request.tenant_id
        route = self.routes.route(tenant)
        if route is None:
            validate_id("tenant id", tenant)
            raise NotFound(f"unknown tenant {tenant!r}: no model registered")
        if request.version:
            validate_id("version", request.version)
        else:
            request.version = route.serving
        shard = self.shards.get(tenant, route.shard_size or self.default_shard_size)
        if not shard:
            raise Unavailable("no live workers in the fleet")

        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self.default_deadline)
        failures: list[str] = []
        for worker_id in self.pool.choose_order(shard, self.spill_inflight):
            stub = self.pool.stubs.get(worker_id)
            timeout = deadline - time.monotonic()
            if stub is None:
                failures.append(f"{worker_id}: left the fleet")
                continue
            if timeout <= 0:
                break
            self.pool.inflight[worker_id] = self.pool.inflight.get(worker_id, 0) + 1
            try:
                return await stub.Predict(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    await context.abort(exc.code(), exc.details() or exc.code().name)
                failures.append(f"{worker_id}: {exc.code().name}")
            finally:
                self.pool.inflight[worker_id] -= 1
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline exceeded for tenant {tenant!r} after trying "
                                   f"{'; '.join(failures) or 'no worker'}")
        raise Unavailable(f"every worker of tenant {tenant!r}'s shard failed: {'; '.join(failures)}")
