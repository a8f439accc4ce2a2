"""The worker's model cache in a real worker process: byte budget, W-TinyLFU eviction, single flight."""
from __future__ import annotations

from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.v1 import predictor_pb2, worker_pb2
from worker.predictor import LoadedModel
from tests.fleet import predict, predictor, stats, worker_stub


def test_hot_models_survive_a_scan_of_one_off_tenants_within_the_byte_budget(fleet):
    """W-TinyLFU in a real worker. Model sizes there are measured and vary by tens of %, so this
    checks what holds whatever the sizes: a plain LRU of this budget (4-6 models) would hold
    none of the hot tenants after 12 one-off tenants; the exact choices are in test_tinylfu_cache."""
    model = LoadedModel.from_model_text(train_model_text(1))
    one_model = model.nbytes
    model.close()
    budget = one_model * 8
    hot, scan = ["hot-a", "hot-b"], [f"scan-{i}" for i in range(12)]
    for tenant in hot + scan + ["first", "warmed", "after-warm"]:
        fleet.register(tenant, "v1", seed=1)  # one artifact, many tenants: cache entries of about one size
    worker = fleet.start_worker("w1", cache_bytes=budget)
    stub = worker_stub(worker.address)
    x = sample_features(1, 1)[0]
    for tenant in [*hot, "first", *hot]:  # asked for again once out of the window: protected
        predict(stub, tenant, x, version="v1")
    for tenant in scan:  # each asked for once
        predict(stub, tenant, x, version="v1")
        s = stats(worker.address)
        assert s.bytes_used <= s.bytes_budget == budget
    s = stats(worker.address, include_models=True)
    loads = {m.tenant_id: m.loads for m in s.models}
    assert loads.get("hot-a") == loads.get("hot-b") == 1, loads
    assert scan[-1] in loads  # the newest model is always held (the window)
    assert s.loads_total == len(hot) + 1 + len(scan)
    assert s.admission_rejections_total >= 1
    assert s.evictions_total == s.loads_total - s.models_loaded >= s.admission_rejections_total
    predict(stub, "hot-a", x, version="v1")
    assert stats(worker.address).loads_total == s.loads_total  # a hit

    # A rebalance's Warm is admitted past the window whatever the tenant's frequency here so far
    # (a one-off load at this point is refused: see the rejections above).
    assert stub.Warm(worker_pb2.WarmRequest(tenant_id="warmed", version="v1"), timeout=10).loaded
    predict(stub, "after-warm", x, version="v1")  # pushes "warmed" out of the window
    assert "warmed" in {m.tenant_id for m in stats(worker.address, include_models=True).models}


def test_64_concurrent_cold_requests_cause_one_load(fleet):
    # A slow load (1500 trees: ~13 ms of parsing, ~20 ms in all) keeps the window open while all
    # 64 requests arrive; at 300 trees (~4 ms) the last ones could come after it and just hit.
    fleet.register("acme", "v1", seed=1, num_trees=1500)
    fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    request = predictor_pb2.PredictRequest(tenant_id="acme", features=list(x))
    futures = [stub.Predict.future(request, timeout=20) for _ in range(64)]  # all in flight at once
    answers = [f.result() for f in futures]
    assert {a.model_version for a in answers} == {"v1"} and len(answers) == 64
    s = stats(fleet.procs[0].address, include_models=True)
    assert s.loads_total == 1
    assert s.misses_total >= 2  # several requests really did wait on the same cold load
    assert [(m.tenant_id, m.loads) for m in s.models] == [("acme", 1)]
