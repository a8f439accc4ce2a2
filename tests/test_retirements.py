"""Workers follow gc's tombstones (worker.retirements): the watch on a real etcd through a restart
and a compaction, and what the model cache and the loader do with a retired version, with real
LightGBM models. The whole path in real processes: test_gc.py."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

import pytest

from modelfleet import processes
from modelfleet.cli.main import build_parser
from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.errors import FailedPrecondition, NotFound
from modelfleet.store import LocalStore
from version_service.retention import apply_gc, plan_gc
from worker import predictor
from worker.loading import ModelLoader
from worker.model_cache import ModelCache
from worker.predictor import LoadedModel
from worker.retirements import RetirementWatch
from worker.server import serve



@pytest.fixture(scope="module")
def text() -> str:
    return train_model_text(seed=1, num_features=8, num_trees=20, num_leaves=15)


@pytest.fixture
def frees(monkeypatch) -> list[int]:
    """The boosters freed, by handle: each must be freed exactly once."""
    freed: list[int] = []
    real_free = predictor._free_native

    def recording_free(fast_config: int, booster: int, row_predictor=None) -> None:
        freed.append(booster)
        real_free(fast_config, booster, row_predictor)

    monkeypatch.setattr(predictor, "_free_native", recording_free)
    return freed


def test_a_retired_model_leaves_the_cache_and_is_freed_once_its_last_user_is_done(frees, text):
    cache = ModelCache(lambda tenant, version: LoadedModel.from_model_text(text), 64 << 20, load_threads=1)
    row = sample_features(1, 1, num_features=8)[0]

    async def scenario() -> tuple[int, list[float], list[float]]:
        kept, _ = await cache.get("acme", "v2")
        model, _ = await cache.get("acme", "v1")
        with model.borrow():  # a batch predicting with it in the predict pool, as the servicer's
            dropped = cache.retire([("acme", "v1"), ("acme", "v9")])  # v9: not held, nothing to do
            processes.wait_for(lambda: model.closed, 5, what="the eviction to close the model")
            assert frees == []  # closed on the closer thread, but the borrower still has it
            during = model.predict(row)
        return dropped, during, kept.predict(row)

    try:
        dropped, during, kept = asyncio.run(scenario())
        assert dropped == 1 and len(during) == len(kept) == 1
        assert [key for key, _ in cache.items()] == [("acme", "v2")]
        assert cache.counters.retirements == cache.counters.evictions == 1
        assert len(frees) == 1  # by the borrower, on leaving
    finally:
        cache.close()
    assert len(frees) == 2 and len(set(frees)) == 2  # v2 at shutdown; v1 not again


def test_a_load_in_flight_when_its_version_is_retired_answers_not_found_and_is_not_kept(frees, text):
    """The load may have read the version record before gc removed it: what it loaded must not
    enter the cache, or the worker would serve the removed version until evicted."""
    started, go = threading.Event(), threading.Event()

    def slow_loader(tenant: str, version: str) -> LoadedModel:
        started.set()
        go.wait(10)
        return LoadedModel.from_model_text(text)

    cache = ModelCache(slow_loader, 64 << 20, load_threads=1)

    async def scenario() -> None:
        request = asyncio.ensure_future(cache.get("acme", "v1"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        cache.retire([("acme", "v1")])
        go.set()
        with pytest.raises(NotFound, match="tenant 'acme' has no version 'v1'"):
            await request
        with pytest.raises(NotFound):  # remembered for a moment, as any NOT_FOUND load
            await cache.get("acme", "v1")

    try:
        asyncio.run(scenario())
        assert len(cache) == 0 and cache.counters.loads == 0 and cache.counters.load_failures == 0
    finally:
        cache.close()
    assert len(frees) == 1


def test_a_record_read_while_its_version_is_forgotten_is_not_kept(fleet):
    """The loader keeps version records; one read from etcd before a gc and stored after the
    worker forgot that version must not come back as if it were still registered."""
    fleet.register("acme", "v1", seed=1)
    loader = ModelLoader(fleet.client, fleet.keys, LocalStore(fleet.store_dir))


    class TombstoneDuringRead:  # the read answers, then gc's tombstone arrives before it is kept
        endpoints = fleet.client.endpoints

        def get(self, key):
            answer = fleet.client.get(key)
            loader.forget([("acme", "v1")])
            return answer

    loader.client = TombstoneDuringRead()
    assert loader.record("acme", "v1").version == "v1"  # this caller had it: the read predates the gc
    loader.client = fleet.client
    fleet.client.delete(fleet.keys.version("acme", "v1"))  # gc's removal
    with pytest.raises(NotFound):
        loader.record("acme", "v1")  # read anew, not served from what was kept


def test_the_watch_resumes_after_an_etcd_restart_and_lists_the_tombstones_after_a_compaction(
        own_etcd_fleet, caplog):
    etcd, fleet = own_etcd_fleet
    for n in range(1, 6):
        fleet.register("acme", f"v{n}", seed=n)
    seen: list[tuple[str, str]] = []
    watch = RetirementWatch(fleet.etcd_endpoint, fleet.keys, seen.extend)
    caplog.set_level(logging.INFO, logger="modelfleet.etcd_watch")
    watch.watch()
    try:
        watch.wait_synced(10)
        apply_gc(fleet.registry, plan_gc(fleet.registry, keep=4, tenant="acme"))
        processes.wait_for(lambda: seen == [("acme", "v1")], 5, what="the first tombstone")

        etcd.stop()  # the worker serves on; the watch retries, saying so once
        processes.wait_for(lambda: not watch.connected, 10, what="the watch to notice etcd is gone")
        etcd.start()
        processes.wait_for(lambda: watch.connected, 10, what="the watch to reconnect")
        apply_gc(fleet.registry, plan_gc(fleet.registry, keep=3, tenant="acme"))
        processes.wait_for(lambda: seen == [("acme", "v1"), ("acme", "v2")], 5, what="a tombstone after it")
        assert watch.resyncs == 1  # resumed from its revision: nothing listed again
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retirement_watch.")]
        assert said == ["retirement_watch.disconnected", "retirement_watch.reconnected"], said
    finally:
        watch.stop()

    # A watch that was away while etcd compacted the revision it would resume from lists what it
    # missed: the tombstones written since (v3, v4), not those of v1 and v2 from before its revision.
    seen.clear()
    late = RetirementWatch(fleet.etcd_endpoint, fleet.keys, seen.extend)
    try:
        late.sync()  # its start revision
        apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1, tenant="acme"))  # v3 and v4: unseen
        fleet.client.compact(fleet.client.get_prefix_response(fleet.keys.routes).header.revision)
        late.watch()
        processes.wait_for(lambda: late.resyncs == 2, 10, what="the list after the compaction")
        assert sorted(seen) == [("acme", "v3"), ("acme", "v4")] and late.retired == 2
        fleet.register("acme", "v6", seed=6)
        apply_gc(fleet.registry, plan_gc(fleet.registry, keep=1, tenant="acme"))  # followed again: v5 only
        processes.wait_for(lambda: late.retired == 3, 5, what="a tombstone after the list")
        assert sorted(seen) == [("acme", f"v{n}") for n in (3, 4, 5)]
    finally:
        late.stop()


def test_a_worker_whose_start_fails_leaves_no_retirement_watch_running(fleet):
    """The watch starts first (its read overlaps the server's start); a start that fails after it,
    here on a port in use, stops it rather than leaving its thread to run until the process exits."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    args = build_parser().parse_args(["worker", "--etcd", fleet.etcd_endpoint, "--prefix", fleet.prefix,
                                      "--store", str(fleet.store_dir), "--host", "127.0.0.1",
                                      "--port", str(taken.getsockname()[1])])
    before = set(threading.enumerate())
    try:
        with pytest.raises(FailedPrecondition, match="cannot listen"):
            asyncio.run(serve(args))
    finally:
        taken.close()
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith(RetirementWatch.name)] == []
