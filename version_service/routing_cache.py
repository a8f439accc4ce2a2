"""The router's in-memory copy of routes/, workers/, drains/ and apikeys/, fed by one etcd watch.

Every Predict reads this cache; none talks to etcd. It starts (`start`: Unavailable when etcd does
not answer in time) with one ranged read per prefix (all at the same revision), then watches from
the next revision (version_service.etcd_watch: when the watch breaks it reconnects and resumes
from the last revision it applied, so no event is lost; when etcd has compacted that revision
away it re-reads everything). While etcd is away the cache keeps serving what it has.

Invariant: `revision` is the etcd revision of the newest change applied; every change up to it
is in the maps.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import grpc
from pyetcd.etcdrpc import kv_pb2

from modelfleet.log import event
from version_service.etcd_watch import PrefixWatch
from version_service.schema import (ApiKeyRecord, CorruptRecord, DrainRecord, Keys, RouteRecord, WorkerRecord,
                                    live_members)

log = logging.getLogger("modelfleet.routing_cache")

ChangeListener = Callable[[str], None]  # called with "routes" or "workers" from the watch thread


class RoutingCache(PrefixWatch):
    name = "routing_cache"

    def __init__(self, etcd: str, keys: Keys, timeout: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 user: str | None = None, password: str | None = None) -> None:
        super().__init__(etcd, timeout, credentials, user, password)
        self.keys = keys
        self.routes: dict[str, RouteRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.drains: dict[str, DrainRecord] = {}
        self.api_keys: dict[str, ApiKeyRecord] = {}
        self.last_change = time.monotonic()
        self._listeners: list[ChangeListener] = []

    # -- reads (any thread) ----------------------------------------------------------------
    def route(self, tenant: str) -> RouteRecord | None:
        return self.routes.get(tenant)

    def live_members(self):
        """Shard members now: registered, not joining, not drained."""
        return live_members(self.workers, self.drains)

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    # -- the watch's hooks -----------------------------------------------------------------
    def _prefixes(self):
        """(prefix, record class, key parser, map attribute) for every watched prefix."""
        return ((self.keys.routes, RouteRecord, self.keys.tenant_of_route, "routes"),
                (self.keys.workers, WorkerRecord, self.keys.worker_of_key, "workers"),
                (self.keys.drains, DrainRecord, self.keys.worker_of_drain, "drains"),
                (self.keys.api_keys, ApiKeyRecord, self.keys.key_of_api_key, "api_keys"))

    def watched_prefixes(self) -> list[str]:
        return [prefix for prefix, *_ in self._prefixes()]

    def resync(self) -> None:
        revision = 0
        maps: dict[str, dict] = {}
        for prefix, cls, parse_key, attr in self._prefixes():
            records = {}
            for page, revision in self.ranged(prefix, revision):
                for item in page:
                    record = self._decode(cls, item)
                    if record is not None:
                        records[parse_key(item.key.decode())] = record
            maps[attr] = records
        for attr, records in maps.items():
            setattr(self, attr, records)
        self.revision = revision
        self.last_change = time.monotonic()
        event(log, "routing_cache.synced", revision=revision, tenants=len(self.routes), workers=len(self.workers),
              drains=len(self.drains))
        self._notify("routes")
        self._notify("workers")

    @staticmethod
    def _decode(cls, item):
        try:
            return cls.from_json(item.value)
        except CorruptRecord as exc:
            event(log, "routing_cache.bad_record", level=logging.WARNING, key=item.key.decode(errors="replace"),
                  error=str(exc))
            return None

    def _notify(self, kind: str) -> None:
        for listener in self._listeners:
            try:
                listener(kind)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the watch
                log.exception("routing_cache.listener_failed")

    def apply(self, events) -> None:
        changed: set[str] = set()
        for ev in events:
            key = ev.kv.key.decode()
            for prefix, cls, parse_key, attr in self._prefixes():
                if key.startswith(prefix):
                    records = getattr(self, attr)
                    name = parse_key(key)
                    if ev.type == kv_pb2.Event.DELETE:
                        records.pop(name, None)
                    else:
                        record = self._decode(cls, ev.kv)
                        if record is not None:
                            records[name] = record
                    changed.add({"routes": "routes", "api_keys": "api_keys"}.get(attr, "workers"))  # drains: membership
                    break
            self.revision = max(self.revision, ev.kv.mod_revision)
        if changed:
            self.last_change = time.monotonic()
        for kind in sorted(changed):
            self._notify(kind)
