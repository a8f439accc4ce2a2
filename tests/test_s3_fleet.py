"""A fleet whose model store is S3-compatible object storage (moto over real HTTP on loopback)."""
from __future__ import annotations

import lightgbm
import numpy as np

from modelfleet.demo_models import sample_features
from modelfleet.store import open_store
from version_service.registry import Registry
from tests.fleet import predict, predictor, stats
from tests.test_store_s3 import BUCKET, s3_endpoint  # noqa: F401 - the fixture


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
