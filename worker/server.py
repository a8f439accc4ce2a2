"""`modelfleet worker`: one multi-model worker process.

Start: follow gc's tombstones (worker.retirements), listen (port 0 picks a free one), join the
fleet under an etcd lease as `joining`, load the active tenants this worker is about to own
(make-before-break, within --warm-join-budget: worker.join_warmup), go live, report SERVING.
SIGTERM: report NOT_SERVING and leave the fleet first (routers stop sending new requests),
answer what still arrives on a router's stream UNAVAILABLE (it fails over), finish in-flight
requests, free every model, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import time
from typing import Callable

from modelfleet import allocator, event_loop, failpoints, heap
from modelfleet.errors import InvalidArgument, Unavailable
from modelfleet.log import event
from modelfleet.rpc import build_server, set_serving, wait_for_signal
from modelfleet.store import open_store
from modelfleet.v1 import worker_pb2, worker_pb2_grpc
from version_service.etcd_client import EtcdClient, connect_args
from version_service.membership import LeasedRegistration
from version_service.schema import Keys, WorkerRecord, started_stamp, validate_id
from prometheus_client import CollectorRegistry

from modelfleet import metrics, tls, tracing
from worker import memory, predictor
from worker.join_warmup import warm_before_going_live
from worker.loading import ModelLoader
from worker.model_cache import ModelCache
from worker.predict_stream import PredictStreams
from worker.retirements import RetirementWatch, follow_retirements
from worker.servicer import WorkerServicer

log = logging.getLogger("modelfleet.worker")

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
SERVICE_NAME = SERVICE.full_name
HOT_METHODS = (f"/{SERVICE_NAME}/Predict", f"/{SERVICE_NAME}/PredictStream")  # rpc.HotMethodsServer
TRACED_METHODS = {"Predict": "predict", "Warm": "warm"}  # method -> server span name
REGISTER_TIMEOUT_S = 30.0


async def serve(args: argparse.Namespace) -> None:
    for flag, threads in (("--load-threads", args.load_threads), ("--fetch-threads", args.fetch_threads)):
        if threads < 1:
            raise InvalidArgument(f"{flag} must be at least 1, got {threads}")
    memory.limit_arenas(memory.arenas_for(args.load_threads))
    client = connect_args(args)
    keys = Keys(args.prefix)
    if args.worker_id:
        validate_id("worker id", args.worker_id)
    validate_id("zone", args.zone)
    # One --fetch-threads for both: each download holds a fetch thread and one of the S3 client's
    # connections, so a pool smaller than the threads would make downloads wait for a connection.
    store = open_store(args.store, args.store_cache_dir or None, args.store_cache_bytes,
                       endpoint_url=args.s3_endpoint or None, connections=args.fetch_threads)
    loader = ModelLoader(client, keys, store)
    cache = ModelCache(loader.load, args.cache_bytes, args.load_threads, max_queued_loads=args.max_queued_loads,
                       record_digest=loader.record_sha256, fetch_threads=args.fetch_threads)
    # Started first: its read of etcd's revision overlaps the server's start (worker.retirements).
    retirements = follow_retirements(args, keys, loader.forget, cache.retire)
    try:
        await _listen_join_serve(args, client, keys, cache, retirements)
    except BaseException:  # a start that failed leaves no watch thread behind (in-process users: tests)
        retirements.stop()
        raise


async def _listen_join_serve(args: argparse.Namespace, client: EtcdClient, keys: Keys, cache: ModelCache,
                             retirements: RetirementWatch) -> None:
    """The rest of `serve`, from listening to stopping (the module's docstring): `serve` stops the
    retirement watch, started before this, when this fails."""
    registry = CollectorRegistry()
    rpc_metrics = metrics.RpcMetrics(registry, "worker")
    server, health = build_server([SERVICE_NAME], HOT_METHODS)
    port = tls.listen(server, f"{args.host}:{args.port}",
                      tls.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca))
    worker_id = args.worker_id or f"worker-{socket.gethostname()}-{port}"
    tracing.setup_from_args(args, "modelfleet-worker", worker_id)  # before the servicer reads tracing.tracer()
    servicer = WorkerServicer(worker_id, cache)
    measured = rpc_metrics.measured(tracing.traced(servicer, TRACED_METHODS), SERVICE)
    streams = PredictStreams(measured.Predict)  # each frame runs the measured, traced Predict
    _export_cache_metrics(registry, cache, servicer, streams)
    metrics_port = metrics.serve(registry, args.host, args.metrics_port)
    worker_pb2_grpc.add_WorkerServicer_to_server(streams.serving(measured), server)
    await server.start()
    frozen = heap.freeze_startup_heap()  # before any model is loaded: models come and go

    record = WorkerRecord(worker_id=worker_id, address=f"{args.advertise_host}:{port}", zone=args.zone,
                          joining=args.warm_on_join,
                          started=started_stamp())
    membership = LeasedRegistration(client, keys.worker(worker_id), record, ttl=args.lease_ttl)
    # No request before the watch has its start revision: a version loaded then could be removed unseen.
    await _joining_step("follow_retirements", lambda: retirements.wait_synced(1.0))
    await _joining_step("register", membership.start)
    if args.warm_on_join:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, warm_before_going_live, client, keys, record, args)
        await loop.run_in_executor(None, failpoints.pause, "before_going_live")  # inert outside tests
        live = dataclasses.replace(record, joining=False)  # kept by the lease keeper if the lease must be renewed
        await _joining_step("go_live", lambda: membership.update(live))
    await set_serving(health, [SERVICE_NAME], True)
    event(log, "worker.serving", worker=worker_id, address=record.address, zone=args.zone, metrics_port=metrics_port,
          cache_bytes=args.cache_bytes, load_threads=args.load_threads, fetch_threads=args.fetch_threads,
          frozen_objects=frozen, event_loop=event_loop.running_loop_name(), allocator=allocator.active(),
          row_predict=predictor.ROW_PREDICT)

    trimmer = asyncio.get_running_loop().create_task(_trim_after_evictions(cache))
    await wait_for_signal()
    trimmer.cancel()
    await set_serving(health, [SERVICE_NAME], False)
    await asyncio.get_running_loop().run_in_executor(None, membership.stop)
    await asyncio.get_running_loop().run_in_executor(None, retirements.stop)
    streams.drain()  # streamed frames now fail over at once, as new calls to a stopping server do
    await server.stop(grace=10)
    servicer.close()
    cache.close()
    client.close()
    tracing.shutdown()
    event(log, "worker.stopped", worker=worker_id)


def _export_cache_metrics(registry: CollectorRegistry, cache: ModelCache, servicer: WorkerServicer,
                          streams: PredictStreams) -> None:
    """The model cache's own counters, read at scrape time (nothing added to the request path),
    and the load-latency histogram, observed once per load (never on a hit)."""
    metrics.counters(registry, "modelfleet_worker_cache_events",
                     "model cache hits, misses, loads, failures, evictions; misses shed by the load-queue bound; "
                     "misses answered from a remembered load failure (negative_hit); cached models evicted "
                     "because their version record names another artifact (artifact_mismatch); loaded models "
                     "freed because they were asked for less than what they would displace (admission_rejection, "
                     "also counted as eviction); cached models evicted because gc removed their version "
                     "(retirement, also counted as eviction)",
                     lambda: {"hit": cache.counters.hits, "miss": cache.counters.misses, "load": cache.counters.loads,
                              "load_failure": cache.counters.load_failures, "eviction": cache.counters.evictions,
                              "shed": cache.counters.shed, "negative_hit": cache.failures.hits,
                              "artifact_mismatch": cache.counters.artifact_mismatches,
                              "admission_rejection": cache.counters.admission_rejections,
                              "retirement": cache.counters.retirements})
    cache.observe_load = metrics.load_histogram(registry).observe
    metrics.gauges(registry, lambda: {
        "modelfleet_worker_cache_bytes_used": ("bytes the loaded models hold", cache.bytes_used),
        "modelfleet_worker_cache_bytes_budget": ("the cache's byte budget", cache.budget),
        "modelfleet_worker_models_loaded": ("models in the cache", len(cache)),
        "modelfleet_worker_predictions": ("predictions answered since start", servicer.predictions),
        "modelfleet_worker_predict_streams": ("PredictStreams open (routers keep one each)", streams.open_streams),
    })


async def _trim_after_evictions(cache: ModelCache, every_s: float = 1.0) -> None:
    """Once a second, if models were evicted since the last look, give freed heap back."""
    seen = cache.counters.evictions
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        if cache.counters.evictions != seen:
            seen = cache.counters.evictions
            await loop.run_in_executor(None, memory.trim)


async def _joining_step(step: str, call: Callable[[], None]) -> None:
    """Runs a step of joining (blocking), retrying while etcd is unreachable, for up to
    REGISTER_TIMEOUT_S: an etcd stall of a few seconds must not stop a worker, whichever step
    it catches (registering, or going live after the warm-up)."""
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(None, call)
            return
        except Unavailable as exc:
            if time.monotonic() >= deadline:
                raise
            event(log, "worker.join_retry", level=logging.WARNING, step=step, error=str(exc))
            await asyncio.sleep(0.5)
