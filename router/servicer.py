"""The router's Predict, readable top to bottom: route -> version -> shard -> member -> forward.

1. the tenant's route from the watch-fed cache (no etcd per request);
2. the version: the caller's, else the canary's share of a rollout, else the serving one;
3. its shuffle shard over live, non-draining workers (cached per tenant);
4. the member order: affinity to the first member, spill when it is busy;
5. forward with the caller's remaining deadline; on UNAVAILABLE (a dead or leaving worker)
   try the next member while the deadline allows. Errors about the request itself (unknown
   version, bad features, corrupt artifact) come back from the worker and are returned as they
   are: another member would answer the same.
6. a shadow rollout gets a copy afterwards, off the caller's path.
"""
from __future__ import annotations

import time

import grpc

from modelfleet.errors import DeadlineExceeded, NotFound, Unavailable
from modelfleet.rpc import translate_errors
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from router.rollout import Rollouts, in_canary, routing_key
from router.worker_pool import WorkerPool
from sharding import ShardCache
from version_service.routing_cache import RoutingCache
from version_service.schema import validate_id

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
SHADOW_TIMEOUT_S = 2.0


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, routes: RoutingCache, shards: ShardCache, pool: WorkerPool, default_shard_size: int,
                 spill_inflight: int, default_deadline: float, rollouts: Rollouts) -> None:
        self.routes = routes
        self.shards = shards
        self.pool = pool
        self.default_shard_size = default_shard_size
        self.spill_inflight = spill_inflight
        self.default_deadline = default_deadline
        self.rollouts = rollouts

    @translate_errors
    async def Predict(self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        tenant = request.tenant_id
        route = self.routes.route(tenant)
        if route is None:
            validate_id("tenant id", tenant)
            raise NotFound(f"unknown tenant {tenant!r}: no model registered")
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

        remaining = context.time_remaining()
        response = await self.forward(request, shard, remaining if remaining is not None else self.default_deadline)
        if stats is not None and route.shadow is not None and request.version == route.serving:
            self.rollouts.shadow(stats, request, response, lambda r: self.forward(r, shard, SHADOW_TIMEOUT_S))
        return response

    async def forward(self, request: predictor_pb2.PredictRequest, shard: tuple[str, ...],
                      budget_s: float) -> predictor_pb2.PredictResponse:
        """Sends to the shard's members in order until one answers or the budget runs out."""
        deadline = time.monotonic() + budget_s
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
                    raise _passthrough(exc) from None
                failures.append(f"{worker_id}: {exc.code().name}")
            finally:
                self.pool.inflight[worker_id] -= 1
        tenant = request.tenant_id
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline exceeded for tenant {tenant!r} after trying "
                                   f"{'; '.join(failures) or 'no worker'}")
        raise Unavailable(f"every worker of tenant {tenant!r}'s shard failed: {'; '.join(failures)}")


def _passthrough(exc: grpc.aio.AioRpcError) -> Exception:
    """The worker's status and message, unchanged, as a ModelfleetError the front end translates."""
    from modelfleet import errors

    for cls in (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition, errors.ResourceExhausted,
                errors.DeadlineExceeded, errors.AlreadyExists, errors.Conflict):
        if cls.code == exc.code():
            return cls(exc.details() or exc.code().name)
    error = errors.ModelfleetError(exc.details() or exc.code().name)
    error.code = exc.code()
    return error
