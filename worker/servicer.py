"""The worker's gRPC front end: validates, asks the model cache, predicts. No other logic.

Small requests predict inline on the event loop (the C-API single-row call costs microseconds,
less than a thread hop); larger ones (more than INLINE_MAX_WALKS tree walks: rows x trees) run
in a small predict pool, so a large batch never stalls other tenants, batches predict on
several cores at once, and none waits behind model loads, which have their own pool. A warm model's
single-row request therefore never waits for a cold load: a load storm only queues misses
(bounded by --max-queued-loads; beyond it RESOURCE_EXHAUSTED with `retry-after-ms`).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from modelfleet import tracing
from modelfleet.errors import InvalidArgument, ModelfleetError, ResourceExhausted, Unavailable
from modelfleet.rpc import MAX_PAYLOAD_BYTES, translate_errors
from modelfleet.v1 import predictor_pb2, worker_pb2, worker_pb2_grpc
from version_service.schema import validate_id
from worker.artifact_hint import artifact_hint
from worker.failure_scope import mark_model_failure
from worker.model_cache import ModelCache
from worker.overload import RetryLater, set_retry_hint

# Tree walks (rows x trees) a request may cost and still predict on the loop thread: ~4096
# walks take ~20-60 µs, about a thread hop. Any single row of a model up to that size is inline;
# a 100-row batch of a 100-tree model (~600 µs) is not. The old rule counted features (1024), so
# a 100-row batch of a 1000-tree model held the loop, and every other tenant's request on the
# worker, for ~6 ms, and batches used one core. Measured on 2 cores (`loadtest.bench`, warm,
# 100 rows, 100 trees): client -> worker 906 -> 1150 rps; through the router 800 -> 820 rps,
# p99 ~13 -> ~15 ms (the hop's CPU competes with the pool's threads on two cores).
INLINE_MAX_WALKS = 4096
# Values a response may carry (8 bytes each, modelfleet.rpc.MAX_PAYLOAD_BYTES): a multiclass
# batch's answer is rows x classes, larger than its request.
MAX_ANSWER_VALUES = MAX_PAYLOAD_BYTES // 8


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, cache: ModelCache, predict_threads: int = 2) -> None:
        self.worker_id = worker_id
        self.cache = cache
        self._traced = tracing.tracer() is not None  # the `predict` span: tracing.traced, at registration
        self.requests = 0  # every Predict asked of this worker
        self.predictions = 0  # those answered
        self._predict_pool = ThreadPoolExecutor(max_workers=predict_threads, thread_name_prefix="predict")

    @translate_errors
    async def Predict(self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        self.requests += 1
        tenant = validate_id("tenant id", request.tenant_id)
        version = validate_id("version", request.version)
        try:
            model, loaded = await self.cache.get(tenant, version, artifact_hint(request))
        except RetryLater as exc:
            set_retry_hint(context, exc)
            raise
        except Unavailable:  # the store or etcd, for this model's load: not this worker's health
            mark_model_failure(context)
            raise
        features = request.features
        per_row = request.features_per_row
        if per_row and per_row != model.num_features:  # the caller's row width, when it says one
            raise InvalidArgument(f"tenant {tenant!r} version {version!r} takes {model.num_features} features "
                                  f"per row; the request's rows have {per_row}")
        rows = len(features) // max(1, model.num_features)
        if self._traced:
            tracing.set_attributes(tracing.current_span(), {
                "version": version, "rows": rows, "cache": "miss" if loaded else "hit"})
        try:
            if rows * model.num_trees <= INLINE_MAX_WALKS:
                predictions = model.predict(features)
            else:
                answer_values = rows * model.num_classes
                if answer_values > MAX_ANSWER_VALUES:  # refused before seconds of work that cannot be sent
                    raise ResourceExhausted(
                        f"the answer would be {answer_values} values ({model.num_classes} per row), over the "
                        f"{MAX_ANSWER_VALUES} a response may carry; send at most "
                        f"{MAX_ANSWER_VALUES // model.num_classes} rows per request")
                # Taken on the loop before any await: a hit's model is in the cache, a miss's is
                # kept alive by the cache's delivery hold until this step ends, even if evicted.
                with model.borrow(while_closing=True):
                    predictions = await asyncio.get_running_loop().run_in_executor(
                        self._predict_pool, model.predict, features)
        except ModelfleetError as exc:
            raise type(exc)(f"tenant {tenant!r} version {version!r}: {exc}") from None
        self.predictions += 1
        return predictor_pb2.PredictResponse(predictions=predictions, model_version=version,
                                             worker_id=self.worker_id)

    @translate_errors
    async def Warm(self, request: worker_pb2.WarmRequest, context: grpc.aio.ServicerContext):
        tenant = validate_id("tenant id", request.tenant_id)
        version = validate_id("version", request.version)
        started = time.perf_counter()
        try:
            _, loaded = await self.cache.get(tenant, version, artifact_hint(request), warm=True)
        except RetryLater as exc:
            set_retry_hint(context, exc)
            raise
        except Unavailable:
            mark_model_failure(context)
            raise
        return worker_pb2.WarmResponse(loaded=loaded, load_ms=(time.perf_counter() - started) * 1000)

    @translate_errors
    async def Stats(self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext):
        counters = self.cache.counters
        response = worker_pb2.StatsResponse(
            worker_id=self.worker_id, bytes_used=self.cache.bytes_used, bytes_budget=self.cache.budget,
            models_loaded=len(self.cache), loads_total=counters.loads, load_failures_total=counters.load_failures,
            evictions_total=counters.evictions, hits_total=counters.hits, misses_total=counters.misses,
            predictions_total=self.predictions, requests_total=self.requests, shed_total=counters.shed,
            negative_cache_hits_total=self.cache.failures.hits, artifact_mismatches_total=counters.artifact_mismatches,
            admission_rejections_total=counters.admission_rejections)
        if request.include_models:
            for key, model in self.cache.items():
                idle = self.cache.idle_seconds(key)
                if request.active_within_s <= 0 or idle <= request.active_within_s:
                    response.models.add(tenant_id=key[0], version=key[1], bytes=model.nbytes,
                                        loads=self.cache.load_count(key), idle_s=idle)
        return response

    def close(self) -> None:
        self._predict_pool.shutdown(wait=True)

