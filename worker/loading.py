"""Turns (tenant, version) into a LoadedModel: etcd record (or a router's artifact hint) ->
verified artifact -> booster.

Runs in the worker's load thread pool, never on the event loop; an artifact that is not on this
machine is downloaded on the cache's fetch threads instead (`Fetch`, worker.model_cache). Every
failure names tenant, version and cause: NotFound for an unregistered version,
FailedPrecondition for a missing, corrupt or unparseable artifact, Unavailable when etcd (or a
remote model store) cannot be reached.
"""
from __future__ import annotations

import functools
import threading
import time
from typing import Callable

from cachetools import LRUCache

from modelfleet import tracing
from modelfleet.errors import FailedPrecondition, NotFound, Unavailable
from modelfleet.store import Store, artifact_for
from version_service.etcd_client import EtcdClient, etcd_errors
from version_service.schema import Keys, VersionRecord
from worker.model_cache import Fetch
from worker.predictor import LoadedModel


class ModelLoader:
    """Version records never change once written (gc removes them, and a removed version's name
    never comes back meaning another artifact), so they are cached: a model evicted and loaded
    again costs no etcd round trip (the common case when the working set outgrows the cache), and
    a worker can reload a model it has seen while etcd is away. A record is dropped when the
    worker learns that gc removed its version (`forget`, from worker.retirements), and a load
    whose artifact is gone re-reads the record: the version may be gone too (NOT_FOUND)."""

    def __init__(self, client: EtcdClient, keys: Keys, store: Store, records: int = 20_000) -> None:
        self.client = client
        self.keys = keys
        self.store = store
        self._records: LRUCache = LRUCache(maxsize=records)
        self._records_lock = threading.Lock()  # loads run in a thread pool
        self._forgets = 0  # calls of `forget` so far: a read that straddles one is not kept

    def record(self, tenant: str, version: str) -> VersionRecord:
        with self._records_lock:
            record = self._records.get((tenant, version))
        return record if record is not None else self._read_record(tenant, version)

    def _read_record(self, tenant: str, version: str) -> VersionRecord:
        """The record from etcd, kept for next time; NotFound (and forgotten) when it is gone.
        Unavailable leaves what was kept as it was: a worker reloads models it has seen while
        etcd is away."""
        forgets = self._forgets
        with etcd_errors(self.client, f"looking up tenant {tenant} version {version}"):
            raw, _ = self.client.get(self.keys.version(tenant, version))
        record = VersionRecord.from_json(raw) if raw is not None else None  # parsed outside the load threads' lock
        with self._records_lock:
            if record is None:
                self._records.pop((tenant, version), None)
                raise NotFound(f"tenant {tenant!r} has no version {version!r}")
            if self._forgets == forgets:  # else it may be of a version gc removed while it was read
                self._records[(tenant, version)] = record
        return record

    def forget(self, keys: list[tuple[str, str]]) -> None:
        """Versions gc removed (worker.retirements): their records go, so a load of one reads etcd
        and is NOT_FOUND. A record being read meanwhile is not kept either (it may predate the gc)."""
        with self._records_lock:
            self._forgets += 1
            for key in keys:
                self._records.pop(key, None)

    def record_sha256(self, tenant: str, version: str, fresh: bool = False) -> str:
        """The artifact digest the version record names; `fresh` reads etcd even if cached."""
        return (self._read_record(tenant, version) if fresh else self.record(tenant, version)).sha256

    def load(self, tenant: str, version: str, artifact: str | None = None) -> LoadedModel | Fetch:
        """The model from the version record's artifact, or from `artifact` (a router's hint:
        the digest of the serving version's artifact) without reading the record. When the
        artifact is not on this machine (a remote store's disk cache misses), a `Fetch` instead:
        the cache downloads it on threads that may wait on the network, then makes the model."""
        what = f"tenant {tenant!r} version {version!r}"
        if artifact is None:
            record = self.record(tenant, version)
            path, sha256, num_features = record.artifact, record.sha256, record.num_features
        else:
            path, sha256, num_features = artifact_for(artifact), artifact, None
        checked = artifact is None
        data = self._read(self.store.read_local, tenant, version, path, sha256, what, checked)
        make = functools.partial(self._model, what, sha256, num_features, checked)
        if data is None:
            return Fetch(functools.partial(self._read, self.store.read_verified, tenant, version, path, sha256,
                                           what, checked), make, sha256)
        return make(data)

    def _read(self, read: Callable[[str, str, str], bytes | None], tenant: str, version: str, path: str,
              sha256: str, what: str, checked: bool) -> bytes | None:
        """`read(path, sha256, what)`; a missing or corrupt artifact of a record read before
        (`checked`) is NotFound if gc removed the version meanwhile."""
        try:
            return read(path, sha256, what)
        except FailedPrecondition:
            if checked:  # the record read before may be of a version gc removed since
                try:
                    self._read_record(tenant, version)  # NotFound then, not the artifact's error
                except Unavailable:
                    pass  # etcd cannot say: the artifact's error stands, the record kept stays
            raise

    @staticmethod
    def _model(what: str, sha256: str, num_features: int | None, checked: bool, data: bytes) -> LoadedModel:
        """The model parsed from verified `data`, its feature count checked against the record's."""
        parse_started = time.perf_counter()
        try:
            model = LoadedModel.from_model_text(data)  # bytes: no decode and encode round trip
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"{what}: {exc}") from None
        if tracing.tracer() is not None:  # the cache's `load` span is current in this thread
            tracing.set_attributes(tracing.current_span(), {
                "artifact_bytes": len(data), "parse_seconds": time.perf_counter() - parse_started})
        if num_features is not None and model.num_features != num_features:
            model.close()
            raise FailedPrecondition(f"{what}: artifact has {model.num_features} features, "
                                     f"its record says {num_features}")
        model.artifact_sha256, model.record_checked = sha256, checked
        return model
