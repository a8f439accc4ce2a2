"""Retention: which versions may go, and removing them from etcd and the model store.

A version is kept when it is among a tenant's newest K, or serving, or pinned, or in a rollout
(canary or shadow). An artifact is deleted only when no remaining version of any tenant uses it
(artifacts are content-addressed and shared). Each tenant's removal is one transaction that
fails if the route changed since it was read, so a pin or rollout racing the collection wins.

Artifacts to delete are written down (Keys.gc_pending) before any version goes and crossed off
once deleted: a collection stopped by an unreachable store (or a kill) leaves them for the next
one, which deletes them first; otherwise they would be orphaned, no version left to name them.
Both happen MAX_TXN_OPS keys to an etcd transaction (for 100k artifacts, ~780 round trips
each, not 100k); a batch is crossed off only once each of its artifacts is deleted, so a
stop leaves at most that batch deleted but not crossed off, for the next collection to delete
again (a no-op) and cross off.

Tombstones (Keys.retired_version) go once older than `tombstone_days` (default 7). What reads
them: register and import refuse a removed name with another artifact (after the tombstone goes
the name is free again, as if never registered: no version record names it, no route can, and
every worker dropped the old model when the tombstone was written); workers' retirement watch,
which acts on a tombstone's write, never on its removal, and lists them only after falling
behind an etcd compaction: a worker whose watch is behind by more than `tombstone_days`
(far beyond etcd's compaction retention, 1 h in deploy/) would keep a removed model until
evicted. Removing a tombstone never brings back a version: versions/ is not touched. Each is
deleted only if unchanged since the plan read it (a version gc removed again since has a fresh
one); a batch with one that changed is left whole to the next collection.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Sequence, TypeVar

from modelfleet.errors import Conflict, InvalidArgument, NotFound
from version_service.collection_guard import collecting
from version_service.etcd_client import MAX_TXN_OPS, etcd_errors
from version_service.registry import Registry
from version_service.schema import CorruptRecord, RetiredRecord, RouteRecord, VersionRecord, utc_stamp, validate_id

DEFAULT_TOMBSTONE_DAYS = 7.0
T = TypeVar("T")


@dataclass
class GcPlan:
    keep: int
    removals: dict[str, list[VersionRecord]] = field(default_factory=dict)
    route_revisions: dict[str, int] = field(default_factory=dict)
    artifacts: set[str] = field(default_factory=set)  # no longer used by any kept version
    pending: set[str] = field(default_factory=set)  # written down by a collection that did not finish
    kept_versions: int = 0
    tombstones: dict[str, int] = field(default_factory=dict)  # key -> mod revision: older than tombstone_days

    @property
    def versions(self) -> int:
        return sum(len(v) for v in self.removals.values())

    def to_json(self) -> dict:
        return {"keep": self.keep, "remove_versions": self.versions, "kept_versions": self.kept_versions,
                "remove_artifacts": len(self.artifacts), "remove_tombstones": len(self.tombstones),
                "removals": {t: [v.version for v in vs] for t, vs in sorted(self.removals.items())}}


def plan_gc(registry: Registry, keep: int, tenant: str | None = None,
            tombstone_days: float = DEFAULT_TOMBSTONE_DAYS, now: dt.datetime | None = None) -> GcPlan:
    """What a collection would remove; `now` (aware UTC) dates the tombstones, the clock's by default."""
    if keep < 1:
        raise InvalidArgument(f"--keep must be at least 1, got {keep}")
    if not tombstone_days > 0:
        raise InvalidArgument(f"--tombstone-days must be above 0, got {tombstone_days}")
    keys, client = registry.keys, registry.client
    prefix = keys.versions(validate_id("tenant id", tenant)) if tenant else keys.all_versions
    with etcd_errors(client, "reading versions for garbage collection"):
        versions_resp = client.get_prefix_response(keys.all_versions)  # all: artifacts are shared
        revision = versions_resp.header.revision
        routes_resp = client.get_prefix_response(keys.routes, revision=revision)
        pending_resp = client.get_prefix_response(keys.gc_pending, revision=revision)
        retired_resp = client.get_prefix_response(keys.retired_of_tenant(tenant) if tenant else keys.retired,
                                                  revision=revision)
    routes = {keys.tenant_of_route(kv.key.decode()): (RouteRecord.from_json(kv.value), kv.mod_revision)
              for kv in routes_resp.kvs}
    by_tenant: dict[str, list[tuple[int, VersionRecord]]] = defaultdict(list)
    for kv in versions_resp.kvs:
        name = kv.key.decode()[len(keys.all_versions):].split("/", 1)[0]
        by_tenant[name].append((kv.create_revision, VersionRecord.from_json(kv.value)))
    if tenant and tenant not in by_tenant:
        raise NotFound(f"unknown tenant {tenant!r}: no versions registered")
    plan = GcPlan(keep=keep)
    used: set[str] = set()
    for name, entries in by_tenant.items():
        records = [r for _, r in sorted(entries, key=lambda e: e[0])]
        route, mod_revision = routes.get(name, (None, 0))
        protected = {r.version for r in records[-keep:]}
        if route is not None:
            protected |= {route.serving, route.newest} | route.in_rollout
        in_scope = keys.versions(name).startswith(prefix) if tenant else True
        removable = [r for r in records if r.version not in protected] if in_scope and route is not None else []
        if removable:
            plan.removals[name] = removable
            plan.route_revisions[name] = mod_revision
        if in_scope:  # with --tenant, what that tenant keeps
            plan.kept_versions += len(records) - len(removable)
        used |= {r.artifact for r in records if r not in removable}
    pending = {kv.key.decode()[len(keys.gc_pending):] for kv in pending_resp.kvs}  # a past collection's
    plan.artifacts = ({r.artifact for rs in plan.removals.values() for r in rs} | pending) - used
    plan.pending = pending
    try:
        cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=tombstone_days)
    except OverflowError:  # before year 1 ("keep them all", --tombstone-days 1e6): none is that old
        cutoff = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    plan.tombstones = {kv.key.decode(): kv.mod_revision for kv in retired_resp.kvs if _retired_before(kv.value, cutoff)}
    return plan


def _retired_before(raw: bytes, cutoff: dt.datetime) -> bool:
    """Whether a tombstone was written before `cutoff` (its `retired` stamp). One that is not a
    RetiredRecord with a stamp counts as old: modelfleet never wrote it, and it dates nothing."""
    try:
        return dt.datetime.fromisoformat(RetiredRecord.from_json(raw).retired) < cutoff
    except (CorruptRecord, TypeError, ValueError):
        return True


def apply_gc(registry: Registry, plan: GcPlan) -> tuple[int, int, list[str]]:
    """(versions removed, artifacts deleted, tenants skipped because their route changed)."""
    removed, skipped = 0, []
    if registry.store is not None:
        _write_down(registry, sorted(plan.artifacts - plan.pending))
    for tenant, records in plan.removals.items():
        try:
            registry.delete_versions(tenant, records, plan.route_revisions[tenant])
            removed += len(records)
        except Conflict as exc:  # possibly after some batches of this tenant's versions went
            removed += getattr(exc, "removed", 0)
            skipped.append(tenant)
    deleted = 0
    if registry.store is not None and plan.artifacts:
        txn = registry.client.transactions
        with collecting(registry.client, registry.keys):  # registrations wait; versions read after it count
            still_used = {r.artifact for _, rs in _all_versions(registry) for r in rs}
            for batch in _batches(sorted(plan.artifacts)):
                deleted += sum(bool(registry.store.delete(a)) for a in batch if a not in still_used)
                _transact(registry, "crossing off collected artifacts",  # only once really deleted
                          [txn.delete(registry.keys.gc_pending_artifact(a)) for a in batch])
    return removed, deleted, skipped


def remove_tombstones(registry: Registry, plan: GcPlan) -> int:
    """Deletes the tombstones the plan found old (see the module's docstring); returns how many
    went. Each only if unchanged since the plan read it."""
    txn, removed = registry.client.transactions, 0
    for batch in _batches(sorted(plan.tombstones.items())):
        if _transact(registry, "removing old tombstones", [txn.delete(key) for key, _ in batch],
                     compare=[txn.mod(key) == revision for key, revision in batch]):
            removed += len(batch)
    return removed


def _write_down(registry: Registry, artifacts: list[str]) -> None:
    """Keys.gc_pending for each artifact, before the versions that name them go."""
    txn, stamp = registry.client.transactions, utc_stamp()
    for batch in _batches(artifacts):
        _transact(registry, "writing down the artifacts to collect",
                  [txn.put(registry.keys.gc_pending_artifact(a), stamp) for a in batch])


def _batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in slices that fit one etcd transaction (one op, and at most one compare, each)."""
    for start in range(0, len(items), MAX_TXN_OPS):
        yield items[start:start + MAX_TXN_OPS]


def _transact(registry: Registry, doing: str, ops: list, compare: list | None = None) -> bool:
    """One etcd transaction (one round trip, one revision) of `ops`, if each of `compare` holds."""
    with etcd_errors(registry.client, doing):
        ok, _ = registry.client.transaction(compare=compare or [], success=ops, failure=[])
    return ok


def _all_versions(registry: Registry):
    keys, client = registry.keys, registry.client
    with etcd_errors(client, "re-reading versions"):
        resp = client.get_prefix_response(keys.all_versions)
    grouped: dict[str, list[VersionRecord]] = defaultdict(list)
    for kv in resp.kvs:
        grouped[kv.key.decode()[len(keys.all_versions):].split("/", 1)[0]].append(VersionRecord.from_json(kv.value))
    return grouped.items()
