"""The router's watch-fed cache on a real etcd: start, changes, restart of etcd, compaction."""
from __future__ import annotations

import threading
import time

import pytest

from modelfleet import processes
from modelfleet.errors import Unavailable
from modelfleet.etcd_server import EtcdServer
from version_service.etcd_client import connect
from version_service.registry import Registry
from version_service.routing_cache import RoutingCache
from version_service.schema import Keys, RouteRecord, WorkerRecord
from tests.conftest import new_prefix


def test_cache_loads_then_follows_changes(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.client.put(fleet.keys.route("hand-edited"), "[]")  # JSON, not a record: raised AttributeError
    fleet.client.put(fleet.keys.route("truncated"), '{"serving": "v1"')  # and its sync with it
    cache = RoutingCache(fleet.etcd_endpoint, fleet.keys)
    cache.start()
    try:
        assert cache.route("acme").serving == "v1"
        assert cache.route("hand-edited") is None and cache.route("truncated") is None  # skipped, named in a warning
        fleet.register("acme", "v2", seed=2)
        processes.wait_for(lambda: cache.route("acme").serving == "v2", 1.0, what="new version in cache")
        fleet.register("globex", "v1", seed=3)
        processes.wait_for(lambda: cache.route("globex") is not None, 1.0, what="new tenant in cache")
        fleet.client.put(fleet.keys.worker("w1"), WorkerRecord("w1", "127.0.0.1:1").to_json())
        processes.wait_for(lambda: "w1" in cache.workers, 1.0, what="worker in cache")
        fleet.client.delete(fleet.keys.worker("w1"))
        processes.wait_for(lambda: "w1" not in cache.workers, 1.0, what="worker gone from cache")
        _, meta = fleet.client.get(fleet.keys.route("globex"))
        assert cache.revision >= meta.mod_revision
    finally:
        cache.stop()


def test_a_sync_reads_every_route_in_pages(fleet, monkeypatch):
    from version_service import etcd_watch
    from version_service.schema import RouteRecord

    monkeypatch.setattr(etcd_watch, "RANGE_PAGE", 7)
    tenants = [f"t{i:02d}" for i in range(30)]
    for tenant in tenants:  # straight into etcd: 30 routes, 5 pages
        fleet.client.put(fleet.keys.route(tenant), RouteRecord(serving="v1", newest="v1").to_json())
    fleet.client.put(fleet.keys.worker("w1"), WorkerRecord("w1", "127.0.0.1:1").to_json())
    cache = RoutingCache(fleet.etcd_endpoint, fleet.keys)
    cache.start()
    try:
        assert sorted(cache.routes) == tenants and list(cache.workers) == ["w1"]
    finally:
        cache.stop()


def test_the_first_sync_tries_each_endpoint_and_says_which_did_not_answer(fleet):
    """The first sync (PrefixWatch.start: the router's, as the workers' watch) moves on to the next
    endpoint when one does not answer; when none does in time it is Unavailable naming them, and
    leaves no watch running."""
    fleet.client.put(fleet.keys.route("acme"), RouteRecord(serving="v1", newest="v1").to_json())
    dead = f"127.0.0.1:{processes.free_port()}"
    cache = RoutingCache(f"{dead},{fleet.etcd_endpoint}", fleet.keys)
    cache.start(timeout=10)
    try:
        assert cache.route("acme").serving == "v1"
    finally:
        cache.stop()
    before = set(threading.enumerate())
    with pytest.raises(Unavailable, match=f"^etcd at {dead} unavailable: UNAVAILABLE"):
        RoutingCache(dead, fleet.keys).start(timeout=0.5)
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith(RoutingCache.name)] == []


def test_a_first_sync_slower_than_the_timeout_starts_while_etcd_keeps_answering(fleet, monkeypatch):
    """`start`'s timeout is for an etcd that does not answer, not for a big first read that takes
    longer: a router with many routes (or a busy etcd) refused to start, "no answer within 10 s",
    while every page came back. Here each page (one route) takes ~0.03 s to apply, ~0.9 s in all,
    under a 0.4 s timeout."""
    from version_service import etcd_watch

    monkeypatch.setattr(etcd_watch, "RANGE_PAGE", 1)
    tenants = [f"t{i:02d}" for i in range(30)]
    for tenant in tenants:
        fleet.client.put(fleet.keys.route(tenant), RouteRecord(serving="v1", newest="v1").to_json())

    class Slow(RoutingCache):
        @staticmethod
        def _decode(cls, item):
            time.sleep(0.03)  # the work of a big read, not a wait for anything
            return RoutingCache._decode(cls, item)

    cache = Slow(fleet.etcd_endpoint, fleet.keys)
    cache.start(timeout=0.4)
    try:
        assert sorted(cache.routes) == tenants
    finally:
        cache.stop()


@pytest.fixture
def private_etcd(tmp_path):
    server = EtcdServer(data_dir=tmp_path / "etcd", log_path=tmp_path / "etcd.log").start()
    yield server
    server.cleanup()


def test_cache_keeps_serving_through_an_etcd_restart_and_resumes(private_etcd, fleet):
    keys = Keys(new_prefix())
    client = connect(private_etcd.endpoint)
    registry = Registry(client, keys, fleet.registry.store)
    registry.register("acme", "v1", fleet.model_file(1))
    cache = RoutingCache(private_etcd.endpoint, keys)
    cache.start()
    try:
        private_etcd.stop()
        processes.wait_for(lambda: not cache.connected, 10.0, what="cache to notice etcd is gone")
        assert cache.route("acme").serving == "v1"  # still serving from memory
        private_etcd.start()
        processes.wait_for(lambda: cache.connected, 15.0, what="cache to reconnect")
        registry.register("acme", "v2", fleet.model_file(2))
        processes.wait_for(lambda: cache.route("acme").serving == "v2", 5.0, what="change after restart")
        assert cache.resyncs == 1  # resumed from its revision, no full reload
    finally:
        cache.stop()
        client.close()


def test_cache_resyncs_when_its_revision_was_compacted(private_etcd, fleet):
    keys = Keys(new_prefix())
    client = connect(private_etcd.endpoint)
    registry = Registry(client, keys, fleet.registry.store)
    registry.register("acme", "v1", fleet.model_file(1))
    cache = RoutingCache(private_etcd.endpoint, keys)
    cache.sync()  # its first read, then etcd compacts past it before it watches
    try:
        # Changes the cache has not seen, then compaction past its revision: resuming is impossible.
        registry.register("acme", "v2", fleet.model_file(2))
        registry.register("globex", "v1", fleet.model_file(3))
        client.compact(client.get_prefix_response(keys.routes).header.revision)
        cache.watch()
        processes.wait_for(lambda: cache.route("globex") is not None and cache.route("acme").serving == "v2",
                           10.0, what="resync after compaction")
        assert cache.resyncs == 2
    finally:
        cache.stop()
        client.close()
