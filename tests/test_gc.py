"""`modelfleet gc`: keeps newest K, serving, pinned and rollouts; deletes unshared artifacts; dry run."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading

import grpc
import pytest

from modelfleet import processes
from modelfleet.demo_models import sample_features
from modelfleet.errors import InvalidArgument, NotFound
from modelfleet.store import LocalStore, artifact_for
from tests.fleet import predict, predictor, register_many, stats, worker_stub
from tests.test_metrics import scrape, value
from tests.test_cli import cli
from version_service.etcd_client import MAX_TXN_OPS
from version_service.retention import apply_gc, plan_gc, remove_tombstones
from version_service.schema import CorruptRecord, RetiredRecord
from worker.loading import ModelLoader


def test_gc_keeps_what_matters_and_deletes_only_unshared_artifacts(fleet):
    for n in range(1, 7):
        fleet.register("acme", f"v{n}", seed=n)
    fleet.register("other", "v1", seed=2)  # shares acme v2's artifact
    fleet.registry.pin("acme", "v1")
    fleet.registry.start_rollout("acme", "v3", shadow=True)
    artifacts = {v.version: v.artifact for v in fleet.registry.versions("acme")}
    _retire(fleet, "acme", "v0", days_ago=7.1)  # older than --tombstone-days' default
    _retire(fleet, "acme", "old", days_ago=6.9)

    dry = json.loads(cli(fleet, "gc", "--keep", "2", "--json").stdout)
    assert dry["applied"] is False and dry["removals"] == {"acme": ["v2", "v4"]} and dry["remove_tombstones"] == 1
    assert len(fleet.registry.versions("acme")) == 6 and _tombstones(fleet, "acme") == ["old", "v0"]  # nothing happened

    done = json.loads(cli(fleet, "gc", "--keep", "2", "--yes", "--json").stdout)
    assert done["removed_versions"] == 2 and done["deleted_artifacts"] == 1 and done["removed_tombstones"] == 1
    assert _tombstones(fleet, "acme") == ["old", "v2", "v4"]
    assert [v.version for v in fleet.registry.versions("acme")] == ["v1", "v3", "v5", "v6"]
    assert (fleet.store_dir / artifacts["v2"]).exists()  # still used by tenant other
    assert not (fleet.store_dir / artifacts["v4"]).exists()
    assert fleet.registry.route("acme")[0].serving == "v1"


def test_gc_rejects_a_bad_keep_and_an_unknown_tenant(fleet):
    done = cli(fleet, "gc", "--keep", "0")
    assert done.returncode == 2 and "expected a whole number >= 1, got '0'" in done.stderr
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    fleet.register("other", "v1", seed=3)
    done = cli(fleet, "gc", "--keep", "1", "--tenant", "nosuch")
    assert done.returncode == 1 and done.stderr == "error: unknown tenant 'nosuch': no versions registered\n"
    scoped = json.loads(cli(fleet, "gc", "--keep", "1", "--tenant", "acme", "--json").stdout)
    assert scoped["removals"] == {"acme": ["v1"]} and scoped["kept_versions"] == 1  # acme's, not the fleet's


def test_a_register_racing_gc_of_the_artifact_it_shares_keeps_it_stored(fleet):
    """`register` skips storing a file whose artifact exists; gc deletes an artifact no version
    uses. A registration between the two must not end up serving a deleted artifact."""
    for n in range(1, 4):
        fleet.register("old", f"v{n}", seed=n)  # gc --keep 2 removes v1 and its artifact
    shared = fleet.model_file(1)  # the file of old's v1
    artifact = fleet.registry.version("old", "v1").artifact
    env = dict(fleet.env(), MODELFLEET_FAILPOINT_DIR=str(fleet.root))
    register = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "register", "--tenant", "new",
                                 "--version", "v1", "--model-file", str(shared)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fleet.wait_for(lambda: any(fleet.root.glob("before_register_write.*.ready")),
                   what="the register to have found the artifact stored")
    done = json.loads(cli(fleet, "gc", "--keep", "2", "--tenant", "old", "--yes", "--json").stdout)
    assert done["removed_versions"] == 1 and done["deleted_artifacts"] == 1
    assert not (fleet.store_dir / artifact).exists()
    (fleet.root / "before_register_write.go").touch()
    assert register.wait(60) == 0, register.stderr.read()
    assert fleet.registry.version("new", "v1").artifact == artifact
    assert (fleet.store_dir / artifact).exists()  # stored again before its record was written


def test_a_version_name_gc_removed_is_not_taken_by_another_model_while_its_tombstone_lasts(fleet):
    """Caches key models by (tenant, version) (workers, the routers' OIP records): a name gc freed
    must not come back meaning another artifact, or a worker still holding the old model would
    answer for the new one. The same artifact may come back. After --tombstone-days the tombstone
    goes and the name is free (test_gc_removes_tombstones_older_than_tombstone_days_...)."""
    for n in range(1, 4):
        fleet.register("acme", f"v{n}", seed=n)
    done = json.loads(cli(fleet, "gc", "--keep", "1", "--tenant", "acme", "--yes", "--json").stdout)
    assert done["removed_versions"] == 2
    refused = cli(fleet, "register", "--tenant", "acme", "--version", "v1", "--model-file", str(fleet.model_file(9)))
    assert refused.returncode == 1
    assert "version 'v1' was registered before with another artifact" in refused.stderr
    assert "removed by gc" in refused.stderr and "register this one under a new version" in refused.stderr
    manifest = fleet.root / "manifest.csv"
    manifest.write_text(f"tenant,version,artifact\nacme,v2,{fleet.model_file(9)}\n")
    imported = cli(fleet, "import", str(manifest))
    assert imported.returncode == 1 and "line 2: tenant 'acme' version 'v2' was registered before" in imported.stderr
    assert [v.version for v in fleet.registry.versions("acme")] == ["v3"]
    record, created = fleet.registry.register("acme", "v1", fleet.model_file(1))  # its own artifact again
    assert created and sorted(v.version for v in fleet.registry.versions("acme")) == ["v1", "v3"]


def test_gc_removes_more_versions_than_one_transaction_holds_and_counts_a_partial_one(fleet, monkeypatch):
    model = fleet.model_file(1)
    register_many(fleet, [(tenant, f"v{n:03d}") for n in range(1, 72) for tenant in ("many", "some")], model)
    removed, _, skipped = apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1, tenant="many"))
    assert (removed, skipped) == (70, [])
    assert [v.version for v in fleet.registry.versions("many")] == ["v071"]
    # The route changes between two batches: the second is refused, the first stays done and counted.
    monkeypatch.setenv("MODELFLEET_FAILPOINT_DIR", str(fleet.root))
    outcome = {}
    gc = threading.Thread(target=lambda: outcome.update(
        result=apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1, tenant="some"))))
    gc.start()
    fleet.wait_for(lambda: any(fleet.root.glob("between_retire_batches.*.ready")), what="the first batch")
    (fleet.root / "before_route_write.go").touch()  # the pin's own failpoint: let it through
    fleet.registry.pin("some", "v071")
    (fleet.root / "between_retire_batches.go").touch()
    gc.join(60)
    removed, _, skipped = outcome["result"]
    batch = MAX_TXN_OPS // 2  # a retired version takes 2 operations: the first batch, the most etcd takes
    assert (removed, skipped) == (batch, ["some"]) and len(fleet.registry.versions("some")) == 71 - batch


def _revision(fleet) -> int:
    return fleet.client.get_response(fleet.keys.gc_guard).header.revision


def test_gc_crosses_off_collected_artifacts_in_transactions_not_one_by_one(fleet):
    """Crossing off gc-pending takes a transaction per MAX_TXN_OPS artifacts, not an etcd round trip
    each (100k removed versions were 100k deletes). Each write is one etcd revision, so the
    revisions a collection takes count its writes."""
    for n in (1, 2):
        fleet.register("acme", f"v{n}", seed=n)  # --keep 1 removes v1 and its artifact
    removed = fleet.registry.version("acme", "v1").artifact
    # Left written down by a collection that stopped after deleting them (the store has none).
    left = [artifact_for(f"{n:064x}") for n in range(MAX_TXN_OPS + 22)]
    txn = fleet.client.transactions
    for batch in (left[:100], left[100:]):
        fleet.client.transaction(compare=[], failure=[],
                                 success=[txn.put(fleet.keys.gc_pending_artifact(a), "then") for a in batch])
    plan = plan_gc(fleet.registry, keep=1)
    assert plan.artifacts == {removed, *left}
    before = _revision(fleet)
    assert apply_gc(fleet.registry, plan) == (1, 1, [])
    # Writing down v1's artifact, removing v1, the guard on and off, crossing off 151 in 2 (was 151).
    assert _revision(fleet) - before == 6
    assert fleet.client.get_prefix_response(fleet.keys.gc_pending).count == 0
    assert not (fleet.store_dir / removed).exists()


def test_gc_removes_tombstones_older_than_tombstone_days_and_keeps_the_others(fleet):
    """A tombstone goes once older than --tombstone-days: its name is free again. One that changed
    since the plan read it (the version was removed again) stays. (The CLI's default of 7 days:
    test_gc_keeps_what_matters_and_deletes_only_unshared_artifacts.)"""
    register_many(fleet, [("acme", f"v{n}") for n in range(1, 5)], fleet.model_file(1))
    apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1))  # tombstones of acme v1, v2, v3: fresh
    now = dt.datetime.now(dt.timezone.utc)
    _retire(fleet, "acme", "v1", days_ago=10)
    _retire(fleet, "acme", "v2", days_ago=2)
    with pytest.raises(InvalidArgument, match="--tombstone-days must be above 0, got 0"):
        plan_gc(fleet.registry, keep=1, tombstone_days=0)
    for forever in (1e6, 1e12):  # "keep them all": past datetime's range, none is old (was OverflowError)
        assert plan_gc(fleet.registry, keep=1, tombstone_days=forever).tombstones == {}
    assert remove_tombstones(fleet.registry, plan_gc(fleet.registry, keep=1)) == 1  # 7 days
    assert _tombstones(fleet, "acme") == ["v2", "v3"]

    plan = plan_gc(fleet.registry, keep=1, tombstone_days=1)
    assert plan.to_json()["remove_tombstones"] == 1
    assert list(plan.tombstones) == [fleet.keys.retired_version("acme", "v2")]
    _retire(fleet, "acme", "v2", days_ago=0)  # removed again meanwhile (registered with its artifact, collected)
    assert remove_tombstones(fleet.registry, plan) == 0 and _tombstones(fleet, "acme") == ["v2", "v3"]
    plan = plan_gc(fleet.registry, keep=1, tombstone_days=1, now=now + dt.timedelta(days=1.5))
    assert sorted(plan.tombstones) == [fleet.keys.retired_version("acme", v) for v in ("v2", "v3")]
    assert remove_tombstones(fleet.registry, plan) == 2 and _tombstones(fleet, "acme") == []

    record, created = fleet.registry.register("acme", "v1", fleet.model_file(2))  # the name is free again
    assert created and record.sha256 != fleet.registry.version("acme", "v4").sha256


def test_a_tombstone_in_etcd_that_is_not_one_is_named_not_a_traceback(fleet):
    """A value modelfleet never wrote (a hand edit). JSON of another shape raised AttributeError: a
    traceback from gc and from register; bad JSON read inside etcd_errors passed for 'etcd
    unavailable'. Now it is CorruptRecord (FAILED_PRECONDITION), and gc, which dates tombstones,
    counts it as old and removes it, which frees the name."""
    for raw in ("[]", '"x"', "{not json", "{}", b"\xff"):
        with pytest.raises(CorruptRecord, match="a RetiredRecord in etcd is not valid"):
            RetiredRecord.from_json(raw)
    fleet.register("acme", "v2", seed=2)
    fleet.client.put(fleet.keys.retired_version("acme", "v1"), "[]")
    with pytest.raises(CorruptRecord, match="RetiredRecord in etcd is not valid: a JSON list, not an object"):
        fleet.registry.register("acme", "v1", fleet.model_file(1))
    plan = plan_gc(fleet.registry, keep=1)
    assert list(plan.tombstones) == [fleet.keys.retired_version("acme", "v1")]
    assert remove_tombstones(fleet.registry, plan) == 1
    assert fleet.registry.register("acme", "v1", fleet.model_file(1))[1]


def _retire(fleet, tenant: str, version: str, days_ago: float) -> None:
    """A tombstone as a gc `days_ago` days ago wrote it."""
    stamp = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)).isoformat(timespec="milliseconds")
    fleet.client.put(fleet.keys.retired_version(tenant, version), RetiredRecord("0" * 64, stamp).to_json())


def _tombstones(fleet, tenant: str) -> list[str]:
    return sorted(fleet.keys.retired_of_key(kv.key.decode())[1]
                  for kv in fleet.client.get_prefix_response(fleet.keys.retired_of_tenant(tenant)).kvs)


def test_a_worker_that_read_a_removed_version_answers_not_found_not_a_missing_artifact(fleet):
    """Workers keep version records they read; once gc removes the version and its artifact, a
    load of it is NOT_FOUND (what a worker that never saw it answers), not FAILED_PRECONDITION."""
    for n in range(1, 4):
        fleet.register("acme", f"v{n}", seed=n)
    loader = ModelLoader(fleet.client, fleet.keys, LocalStore(fleet.store_dir))
    loader.load("acme", "v1").close()  # the record is kept
    apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1, tenant="acme"))
    with pytest.raises(NotFound, match="tenant 'acme' has no version 'v1'"):
        loader.load("acme", "v1")


def _status(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_a_worker_drops_a_version_gc_removed_and_answers_not_found_for_it(fleet):
    """A worker answers an explicit version from its cache and keeps the version record it read;
    once gc removes the version, the tombstone reaches it (worker.retirements): the model leaves
    its cache and a request for it is NOT_FOUND, through the router and at the worker, with no
    restart and no eviction by pressure. The other versions it holds stay."""
    for n in range(1, 4):
        fleet.register("acme", f"v{n}", seed=n)
    fleet.register("other", "v1", seed=1)  # keeps v1's artifact stored: only the record can say v1 is gone
    metrics_port = processes.free_port()
    worker = fleet.start_worker("w1", extra=("--metrics-port", str(metrics_port)))
    stub = predictor(fleet.start_router(shard_size=1).address)
    x = sample_features(1, 1)[0]
    for version in ("v1", "v2", "v3"):
        fleet.wait_for(lambda: predict(stub, "acme", x, version=version), what=f"{version} to answer")
    held = stats(worker.address, include_models=True)
    assert {(m.tenant_id, m.version) for m in held.models} == {("acme", "v1"), ("acme", "v2"), ("acme", "v3")}

    removed, _, _ = apply_gc(fleet.registry, plan_gc(fleet.registry, keep=2, tenant="acme"))  # what `gc` runs
    assert removed == 1
    at_worker = worker_stub(worker.address)
    fleet.wait_for(lambda: _status(lambda: predict(stub, "acme", x, version="v1")) == grpc.StatusCode.NOT_FOUND,
                   worker, "the router to answer NOT_FOUND for the removed version", timeout=5)
    with pytest.raises(grpc.RpcError) as refused:
        predict(at_worker, "acme", x, version="v1")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tenant 'acme' has no version 'v1'" in refused.value.details()
    after = stats(worker.address, include_models=True)
    assert {(m.tenant_id, m.version) for m in after.models} == {("acme", "v2"), ("acme", "v3")}
    assert after.models_loaded == 2 and after.evictions_total == held.evictions_total + 1
    assert after.loads_total == held.loads_total  # no load: forgotten with the model, read anew: gone
    metrics = scrape(metrics_port)
    assert value(metrics, "modelfleet_worker_cache_events_total", kind="retirement") == 1
    assert value(metrics, "modelfleet_worker_models_loaded") == 2
    assert predict(stub, "acme", x, version="v2").model_version == "v2"  # a hit, as before
    assert "model.retired tenant=acme version=v1" in worker.log()
