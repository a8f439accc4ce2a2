"""A worker learns of the versions gc removes: an etcd watch on `{prefix}/retired/`.

Why: a worker answers an explicit request for a version (PredictRequest.version) from its model
cache, and keeps the version records it read; neither would ever notice that `modelfleet gc`
removed the version, so the worker would go on answering for it until the model happened to be
evicted. gc writes a tombstone (RetiredRecord) in the transaction that removes each version, so
following the tombstones is enough: on each one the worker forgets the version's record
(worker.loading) and drops its model from the cache (worker.model_cache, freed as an eviction
frees it), within a moment of the gc. A later request for it reads etcd and gets NOT_FOUND.

What it costs: one small read at start (etcd's current revision: a starting worker holds
nothing of any version, so there is nothing to drop) and one watch stream. Every worker sees
every tombstone gc writes, ~100 bytes each, and drops only what it holds.

Through etcd outages it is version_service.etcd_watch's: the worker keeps serving, the watch
retries with a back-off (one warning when it goes, one line when it is back), resumes from the
last revision it saw; if etcd compacted that away meanwhile, it lists the tombstones written after
that revision (keys only, in pages; etcd filters on each key's mod_revision) and drops every
version listed that it holds: none is missed, and none delivered before is delivered again.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc
from pyetcd.etcdrpc import kv_pb2

from modelfleet.log import event
from version_service.etcd_client import etcd_access
from version_service.etcd_watch import PrefixWatch
from version_service.schema import Keys

log = logging.getLogger("modelfleet.retirements")

Retired = list[tuple[str, str]]  # (tenant, version) pairs
OnRetired = Callable[[Retired], None]  # called from the watch thread


class RetirementWatch(PrefixWatch):
    name = "retirement_watch"

    def __init__(self, etcd: str, keys: Keys, on_retired: OnRetired, *, timeout: float = 5.0,
                 credentials: grpc.ChannelCredentials | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        super().__init__(etcd, timeout, credentials, user, password)
        self.keys = keys
        self.retired = 0  # tombstones seen (watched, or listed after a compaction)
        self._on_retired = on_retired

    def watched_prefixes(self) -> list[str]:
        return [self.keys.retired]

    def resync(self) -> None:
        if self.resyncs == 0:  # starting: nothing is held yet, so only what comes next matters
            self.revision = self.current_revision()
            event(log, "retirement_watch.started", revision=self.revision)
            return
        # Compacted away (or etcd lost our revision): what the watch missed is exactly the tombstones
        # written after the last revision applied. Older ones were delivered already; listing every
        # tombstone kept (gc keeps them --tombstone-days) would hand the worker those gcs again.
        since, revision, listed = self.revision + 1, 0, 0
        for page, revision in self.ranged(self.keys.retired, keys_only=True, min_mod_revision=since):
            listed += len(page)
            self._deliver([kv.key.decode() for kv in page])
        self.revision = revision
        event(log, "retirement_watch.synced", revision=revision, since_revision=since, listed=listed,
              retired=self.retired)

    def apply(self, events) -> None:
        self._deliver([ev.kv.key.decode() for ev in events if ev.type == kv_pb2.Event.PUT])

    def _deliver(self, keys: list[str]) -> None:
        retired = [pair for pair in map(self.keys.retired_of_key, keys) if pair is not None]
        if not retired:
            return
        self.retired += len(retired)
        try:
            self._on_retired(retired)
        except Exception:  # noqa: BLE001 - a bug there must not stop the watch
            log.exception("retirement_watch.callback_failed")


def follow_retirements(args, keys: Keys, forget: OnRetired, retire: OnRetired) -> RetirementWatch:
    """Starts the watch for a worker: on each batch of tombstones, `forget` (the loader's kept
    records, in the watch thread) and then `retire` (the model cache, on the running event loop).
    In that order: a request that misses once the records are forgotten reads etcd itself."""
    loop = asyncio.get_running_loop()

    def on_retired(retired: Retired) -> None:
        forget(retired)
        try:
            loop.call_soon_threadsafe(retire, retired)
        except RuntimeError:  # the loop closed: the worker is stopping
            pass

    watch = RetirementWatch(args.etcd, keys, on_retired, **etcd_access(args))
    watch.watch()  # the worker waits for its first sync (`wait_synced`) before it registers
    return watch

