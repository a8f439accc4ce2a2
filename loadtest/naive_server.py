"""The naive design, for comparison: one Python gRPC server holding every tenant's model itself.

What a first version of "serve a LightGBM model per tenant" usually looks like, written plainly:
a synchronous `grpc.server` on a thread pool implementing `modelfleet.v1.Predictor/Predict`;
on a tenant's first request it reads the artifact from the model store and parses it with
`lightgbm.Booster(model_str=...)`; boosters live in a `cachetools.LRUCache` bounded by count
(under one lock); predictions go through `Booster.predict` on a reshaped numpy array. No router,
no shards, no single-flight (two threads missing the same tenant both load it), no etcd: the
tenant -> artifact map comes from a JSON manifest that `loadtest.bench` writes:

    {"store": "/abs/store/root", "version": "v1", "tenants": {"t-000001": "sha256/ab/ab....lgbm", ...}}

Prediction runs with num_threads=1, like the worker's C-API calls, so that a comparison with
the fleet measures the design and not OpenMP spinning on a small machine.

    python -m loadtest.naive_server --port 50080 --manifest manifest.json [--cache-models 1000]

Also serves grpc.health.v1 (SERVING once the manifest is read) and `/loadtest.Naive/Stats`
(raw bytes in, JSON out: hits, misses, loads, models), which the benchmark reads between cells.
"""
from __future__ import annotations

import argparse
import json
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import lightgbm
import numpy as np
from cachetools import LRUCache
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelfleet import allocator, config
from modelfleet.rpc import SERVER_OPTIONS
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc

STATS_METHOD = "/loadtest.Naive/Stats"


class NaivePredictor(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, manifest: dict, cache_models: int) -> None:
        self.store = Path(manifest["store"])
        self.version = manifest.get("version", "v1")
        self.artifacts: dict[str, str] = manifest["tenants"]
        self.cache: LRUCache = LRUCache(maxsize=cache_models)
        self.lock = threading.Lock()
        self.hits = self.misses = self.loads = 0

    def _booster(self, tenant: str) -> lightgbm.Booster:
        with self.lock:
            booster = self.cache.get(tenant)
            if booster is not None:
                self.hits += 1
                return booster
            self.misses += 1
        text = (self.store / self.artifacts[tenant]).read_text()
        booster = lightgbm.Booster(model_str=text)
        with self.lock:
            self.loads += 1
            self.cache[tenant] = booster
        return booster

    def Predict(self, request: predictor_pb2.PredictRequest, context: grpc.ServicerContext):
        tenant = request.tenant_id
        if tenant not in self.artifacts:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tenant {tenant!r}")
        if request.version and request.version != self.version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"tenant {tenant!r} has no version {request.version!r}")
        booster = self._booster(tenant)
        n = booster.num_feature()
        features = np.array(request.features, dtype=np.float64)
        if features.size == 0 or features.size % n:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"expected a multiple of {n} features ({n} per row), got {features.size}")
        predictions = booster.predict(features.reshape(-1, n), num_threads=1)
        return predictor_pb2.PredictResponse(predictions=np.ravel(predictions).tolist(),
                                             model_version=self.version, worker_id="naive")

    def stats(self, request: bytes, context) -> bytes:
        with self.lock:
            doc = {"hits": self.hits, "misses": self.misses, "loads": self.loads, "models": len(self.cache)}
        return json.dumps(doc).encode()


def build_server(manifest_path: Path, cache_models: int, threads: int,
                 host: str, port: int) -> tuple[grpc.Server, int]:
    manifest = json.loads(Path(manifest_path).read_text())
    servicer = NaivePredictor(manifest, cache_models)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=SERVER_OPTIONS)
    predictor_pb2_grpc.add_PredictorServicer_to_server(servicer, server)
    stats = grpc.method_handlers_generic_handler("loadtest.Naive", {
        "Stats": grpc.unary_unary_rpc_method_handler(servicer.stats)})
    server.add_generic_rpc_handlers((stats,))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="JSON: store root, version, tenant -> artifact")
    parser.add_argument("--cache-models", type=int, default=1000, help="boosters kept (LRU by count)")
    parser.add_argument("--threads", type=int, default=16, help="gRPC server thread pool size")
    # the workers' malloc: the comparison is between designs, not allocators
    config.add_options(parser, config.ALLOCATOR)
    args = parser.parse_args(argv)
    allocator.ensure(args.allocator)
    server, bound = build_server(args.manifest, args.cache_models, args.threads, args.host, args.port)
    print(f"naive_server listening on {args.host}:{bound}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
