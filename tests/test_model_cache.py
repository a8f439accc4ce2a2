"""The worker's model cache in a real worker process: byte budget, LRU eviction, single flight."""
from __future__ import annotations

from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.v1 import predictor_pb2
from worker.predictor import LoadedModel
from tests.fleet import predict, predictor, stats, worker_stub


def test_lru_evicts_least_recently_used_within_the_byte_budget(fleet):
    model = LoadedModel.from_model_text(train_model_text(1))
    one_model = model.nbytes
    model.close()
    budget = int(one_model * 3.5)
    tenants = [f"t{i}" for i in range(6)]
    for tenant in tenants:
        fleet.register(tenant, "v1", seed=1)  # one artifact, six tenants: six cache entries of one size
    worker = fleet.start_worker("w1", cache_bytes=budget)
    stub = worker_stub(worker.address)
    x = sample_features(1, 1)[0]
    for tenant in tenants:
        predict(stub, tenant, x, version="v1")
        s = stats(worker.address)
        assert s.bytes_used <= s.bytes_budget == budget
    s = stats(worker.address, include_models=True)
    cached = {m.tenant_id for m in s.models}
    assert 2 <= len(cached) <= 4, cached
    assert cached == set(tenants[-len(cached):])  # the most recently used survive
    assert s.evictions_total == s.loads_total - s.models_loaded == len(tenants) - len(cached)

    # A hit refreshes recency: touch the oldest cached tenant, then load a new one.
    oldest = tenants[-len(cached)]
    predict(stub, oldest, x, version="v1")
    predict(stub, tenants[0], x, version="v1")  # evicted earlier: loads again
    s = stats(worker.address, include_models=True)
    cached_now = {m.tenant_id for m in s.models}
    assert oldest in cached_now and tenants[0] in cached_now
    assert s.loads_total == len(tenants) + 1
    assert {m.tenant_id: m.loads for m in s.models}[tenants[0]] == 2


def test_64_concurrent_cold_requests_cause_one_load(fleet):
    fleet.register("acme", "v1", seed=1, num_trees=300)  # a slower load widens the race window
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
