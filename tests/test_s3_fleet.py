"""A fleet whose model store is S3-compatible object storage (moto over real HTTP on loopback)."""
from __future__ import annotations

import json

import grpc
import lightgbm
import numpy as np

from modelfleet.demo_models import sample_features
from modelfleet.store import open_store, sha256_file
from modelfleet.store_cache import DiskCache
from modelfleet.v1 import worker_pb2
from version_service.registry import Registry
from tests.fleet import logged_line, predict, predictor, register_many, stats, worker_stub
from tests.test_store_s3 import BUCKET, dead_endpoint, hung_endpoint, s3_endpoint  # noqa: F401 - the fixtures


def test_workers_load_from_s3_through_a_bounded_disk_cache(fleet, s3_endpoint):  # noqa: F811
    spec = f"s3://{BUCKET}/fleet-{fleet.prefix.rsplit('/', 1)[-1]}"
    registry = Registry(fleet.client, fleet.keys, open_store(spec, endpoint_url=s3_endpoint))
    for i in range(3):
        registry.register(f"t{i}", "v1", fleet.model_file(i))
    cache_dir = fleet.root / "s3-cache"
    worker = fleet.start_worker("w1", extra=("--store", spec, "--s3-endpoint", s3_endpoint,
                                             "--store-cache-dir", str(cache_dir), "--store-cache-bytes", "10MiB"))
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    x = sample_features(4, 3)
    for i in range(3):
        answer = predict(stub, f"t{i}", x.reshape(-1))
        expected = lightgbm.Booster(model_file=str(fleet.model_file(i))).predict(x)
        np.testing.assert_allclose(answer.predictions, expected, atol=1e-9)
    assert stats(worker.address).loads_total == 3
    assert len(list(cache_dir.rglob("*.lgbm"))) == 3  # downloaded once, kept on local disk


def test_a_model_on_local_disk_loads_at_once_while_the_store_hangs(fleet, hung_endpoint):  # noqa: F811
    """Downloads wait on their own threads: with the store hung and the one load thread's worth
    of loads stuck on it, a tenant whose artifact is in the worker's disk cache still answers
    well within its deadline (before, it queued behind the hung GETs for up to ~14 s)."""
    for i in range(3):
        fleet.register(f"t{i}", "v1", seed=i)
    cache_dir = fleet.root / "s3-cache"
    cached = fleet.model_file(0)
    DiskCache(cache_dir, 10 << 20).put(sha256_file(cached), cached.read_bytes())  # t0's artifact only
    worker = fleet.start_worker("w1", extra=("--store", f"s3://{BUCKET}/hung", "--s3-endpoint", hung_endpoint,
                                             "--store-cache-dir", str(cache_dir), "--load-threads", "1"))
    stub = worker_stub(worker.address)
    hung = [stub.Warm.future(worker_pb2.WarmRequest(tenant_id=t, version="v1"), timeout=30) for t in ("t1", "t2")]
    fleet.wait_for(lambda: stats(worker.address).misses_total >= 2, worker, "both loads to wait on the store")
    x = sample_features(1, 1)[0]
    answer = predict(stub, "t0", x, version="v1", timeout=3)
    expected = lightgbm.Booster(model_file=str(cached)).predict(x.reshape(1, -1))
    np.testing.assert_allclose(answer.predictions, expected, atol=1e-9)
    assert not any(f.done() for f in hung)  # still hung on the store (until the fixture's teardown resets them)


def test_a_worker_joining_while_the_store_is_away_goes_live_within_its_warm_budget(
        fleet, hung_endpoint, dead_endpoint):  # noqa: F811
    """--warm-on-join with the store away: each warm-up would wait out the store's timeouts
    (hung: ~10 s per 8 placements, ~20 minutes `joining` for 1000). A store that refuses stops
    the warm-up after 3 failures in a row; a hung one at --warm-join-budget. Either way the
    worker goes live, and its one event says what it loaded, failed and skipped, and why."""
    tenants = [f"t{i:02d}" for i in range(16)]
    register_many(fleet, [(tenant, "v1") for tenant in tenants], fleet.model_file(1))
    active = fleet.start_worker("w1")
    stub, x = worker_stub(active.address), sample_features(1, 1)[0]
    for tenant in tenants:
        predict(stub, tenant, x, version="v1")  # active on w1: each joiner warms its placements of them

    # Shards of 3 (no router publishes a size) in a fleet of 3: each joiner takes every placement.
    away = ("--log-format", "json", "--store", f"s3://{BUCKET}/away", "--shard-size", "3")
    refusing, hanging = fleet.start_workers(
        [("w2", "default"), ("w3", "default")], extra=away,
        each=[("--s3-endpoint", dead_endpoint, "--warm-join-budget", "30"),
              ("--s3-endpoint", hung_endpoint, "--warm-join-budget", "0.5", "--fetch-threads", "4")])
    refused, hung = (json.loads(logged_line(fleet, proc, "worker.warmed_before_join")) for proc in (refusing, hanging))
    assert (refused["placements"], refused["loaded"], refused["stopped"]) == (16, 0, "store_unavailable"), refused
    assert (refused["failed"], refused["skipped"]) == (3, 13) and refused["seconds"] < 10, refused  # 3 in a row
    assert (hung["placements"], hung["skipped"], hung["stopped"]) == (16, 16, "deadline"), hung
    assert 0.5 <= hung["seconds"] < 1.5, hung  # the store's timeouts (~10 s a warm-up) never came into it
    assert json.loads(logged_line(fleet, hanging, "worker.serving"))["fetch_threads"] == 4  # and S3 connections
