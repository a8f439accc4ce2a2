"""The model registry: versions, pins, rollouts and their history — every write a CAS transaction.

Invariants kept here:
- a tenant's route exists iff it has at least one registered version;
- `route.newest` is the most recently registered version; `route.serving` equals it unless
  `route.pinned`;
- a version record never changes once written (same version + same sha256 is an idempotent
  no-op, a different sha256 is AlreadyExists);
- a tenant has at most one rollout (canary or shadow) at a time, of a registered version other
  than the serving one;
- every change of what serves a tenant writes a history record in the same transaction;
- every write compares the revisions it read, so two admins never silently overwrite each
  other: register re-reads and retries (its result does not depend on who wins); pin, unpin,
  rollback and rollouts fail with Conflict when the route changed after they were read.
"""
from __future__ import annotations

import getpass
import math
import secrets
import time
from pathlib import Path
from typing import Callable

from modelfleet import failpoints
from modelfleet.artifact_check import ArtifactChecker
from modelfleet.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, ModelfleetError, NotFound
from modelfleet.store import Store
from sharding import MAX_SHARD_SIZE
from version_service.artifact_intake import TakenIn, take_in
from version_service.collection_guard import quiet_revision, restored_after_collection
from version_service.etcd_client import MAX_TXN_OPS, EtcdClient, etcd_errors
from version_service.schema import (HistoryRecord, Keys, RetiredRecord, RouteRecord, VersionRecord, canary_percent,
                                    retired_conflict, utc_stamp, validate_id)

_REGISTER_ATTEMPTS = 8
# A retired version takes 2 operations (delete its record, put its tombstone); the transaction's
# one compare (the route's revision) counts apart. 64 a transaction, where it was 60 for no reason
# but a round number: fewer round trips, and etcd takes a transaction of exactly MAX_TXN_OPS.
_RETIRED_PER_TXN = MAX_TXN_OPS // 2


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def new_event_id() -> str:
    """Sortable by time, unique across admins writing in the same nanosecond."""
    return f"{time.time_ns():020d}-{secrets.token_hex(3)}"


class Registry:
    def __init__(self, client: EtcdClient, keys: Keys, store: Store | None = None,
                 checker: ArtifactChecker | None = None) -> None:
        """`checker` may be shared by several registries (its owner closes it); by default the
        registry has its own, whose child starts at the first new artifact."""
        self.client = client
        self.keys = keys
        self.store = store
        self.checker = checker or ArtifactChecker()
        self._owns_checker = checker is None

    def close(self) -> None:
        """Stops its own artifact checker's child, if any (the etcd client is the caller's)."""
        if self._owns_checker:
            self.checker.close()

    # -- reads -----------------------------------------------------------------------------
    def route(self, tenant: str) -> tuple[RouteRecord, int]:
        """The tenant's route and its mod revision (for a later compare-and-swap)."""
        validate_id("tenant id", tenant)
        with etcd_errors(self.client, f"reading the route of {tenant}"):
            raw, meta = self.client.get(self.keys.route(tenant))
        if raw is None:
            raise NotFound(f"unknown tenant {tenant!r}: no model registered")
        return RouteRecord.from_json(raw), meta.mod_revision

    def version(self, tenant: str, version: str) -> VersionRecord:
        validate_id("tenant id", tenant)
        validate_id("version", version)
        with etcd_errors(self.client, f"reading {tenant} version {version}"):
            raw, _ = self.client.get(self.keys.version(tenant, version))
        if raw is None:
            raise NotFound(f"tenant {tenant!r} has no version {version!r}")
        return VersionRecord.from_json(raw)

    def versions(self, tenant: str) -> list[VersionRecord]:
        """Registered versions, oldest first (etcd create order)."""
        validate_id("tenant id", tenant)
        with etcd_errors(self.client, f"listing versions of {tenant}"):
            resp = self.client.get_prefix_response(self.keys.versions(tenant))
        kvs = sorted(resp.kvs, key=lambda kv: kv.create_revision)
        return [VersionRecord.from_json(kv.value) for kv in kvs]

    def history(self, tenant: str) -> list[HistoryRecord]:
        """Every recorded change of what serves the tenant, oldest first."""
        validate_id("tenant id", tenant)
        with etcd_errors(self.client, f"reading the history of {tenant}"):
            resp = self.client.get_prefix_response(self.keys.history(tenant))
        return [HistoryRecord.from_json(kv.value) for kv in sorted(resp.kvs, key=lambda kv: kv.key)]

    def tenants(self) -> dict[str, RouteRecord]:
        """Every tenant's route (one ranged read)."""
        with etcd_errors(self.client, "listing tenants"):
            resp = self.client.get_prefix_response(self.keys.routes)
        return {self.keys.tenant_of_route(kv.key.decode()): RouteRecord.from_json(kv.value) for kv in resp.kvs}

    def shard_sizes(self) -> tuple[list[str], dict[str, int]]:
        """Every tenant, and the shard-size overrides: what plans and reports need at 100k+ tenants.

        Only records that mention a shard size are decoded (a byte search is ~50x cheaper than
        json.loads, and most tenants use the default).
        """
        with etcd_errors(self.client, "listing tenants"):
            resp = self.client.get_prefix_response(self.keys.routes)
        cut = len(self.keys.routes)
        tenants, sizes = [], {}
        for kv in resp.kvs:
            tenant = kv.key[cut:].decode()
            tenants.append(tenant)
            if b'"shard_size"' in kv.value:
                size = RouteRecord.from_json(kv.value).shard_size
                if size:
                    sizes[tenant] = size
        return tenants, sizes

    # -- artifacts -------------------------------------------------------------------------
    def store_artifact(self, path: Path) -> TakenIn:
        """The model file's hashed and checked bytes in the store (version_service.artifact_intake):
        a new artifact is checked in the checker's child first; Conflict if the file changed meanwhile."""
        if self.store is None:
            raise FailedPrecondition("registering needs a model store (--store / MODELFLEET_STORE)")
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise InvalidArgument(f"model file {str(path)!r} {what}")
        outcome = take_in(self.store, [path], self.checker.check_each, before_check="before_register_check",
                          before_store="before_register_store")[path]
        if isinstance(outcome, ModelfleetError):
            raise outcome
        return outcome

    # -- writes ----------------------------------------------------------------------------
    def register(self, tenant: str, version: str, model_file: str | Path,
                 actor: str | None = None, reason: str = "") -> tuple[VersionRecord, bool]:
        """Copies the artifact into the store and records it; returns (record, created).

        The new version becomes serving unless the tenant is pinned (then the history records
        nothing: what serves did not change).
        """
        validate_id("tenant id", tenant)
        validate_id("version", version)
        guard = quiet_revision(self.client, self.keys)  # before "already stored" (version_service.collection_guard)
        taken = self.store_artifact(Path(model_file))
        record = taken.record(version)
        route_key, version_key = self.keys.route(tenant), self.keys.version(tenant, version)
        txn = self.client.transactions
        for _ in range(_REGISTER_ATTEMPTS):
            with etcd_errors(self.client, f"registering {tenant} version {version}"):
                # One read of both: gc turns a record into its tombstone in one transaction.
                _, (found, retired) = self.client.transaction(
                    compare=[], success=[txn.get(version_key), txn.get(self.keys.retired_version(tenant, version))],
                    failure=[])
                if found:
                    existing = VersionRecord.from_json(found[0][0])
                    if existing.sha256 == record.sha256:
                        return existing, False
                    raise AlreadyExists(
                        f"tenant {tenant!r} version {version!r} is already registered with a different "
                        f"artifact (sha256 {existing.sha256[:12]}..., this file {record.sha256[:12]}...)")
                if retired and (why := retired_conflict(tenant, version, RetiredRecord.from_json(retired[0][0]),
                                                        record.sha256)):
                    raise AlreadyExists(why)
                raw_route, route_meta = self.client.get(route_key)
                old = RouteRecord.from_json(raw_route) if raw_route is not None else None
                route = next_route_on_register(old, version, record.sha256)
                ops = [txn.put(version_key, record.to_json()), txn.put(route_key, route.to_json())]
                if old is None or old.serving != route.serving:
                    ops.append(self.history_op(tenant, "register", old.serving if old else "", route.serving,
                                                actor, reason))
                unchanged = (txn.version(route_key) == 0 if old is None
                             else txn.mod(route_key) == route_meta.mod_revision)
                failpoints.pause("before_register_write")
                ok, _ = self.client.transaction(
                    compare=[txn.version(version_key) == 0, unchanged, txn.mod(self.keys.gc_guard) == guard],
                    success=ops, failure=[])
            if ok:
                return record, True
            guard = restored_after_collection(self.client, self.keys, self.store, guard, [taken])
        raise Conflict(f"could not register {tenant!r} version {version!r}: the route kept changing; retry")

    def pin(self, tenant: str, version: str, actor: str | None = None, reason: str = "") -> RouteRecord:
        """Serves `version` until unpinned, whatever is registered later."""
        sha256 = self.version(tenant, version).sha256  # NotFound for an unknown version
        return self._update_route(
            tenant, "pin", lambda r: r.with_changes(serving=version, pinned=True, serving_sha256=sha256), actor, reason)

    def unpin(self, tenant: str, actor: str | None = None, reason: str = "") -> RouteRecord:
        """Back to serving the newest registered version."""
        return self._update_route(tenant, "unpin", lambda r: r.with_changes(serving=r.newest, pinned=False),
                                  actor, reason)

    def rollback(self, tenant: str, actor: str | None = None, reason: str = "") -> RouteRecord:
        """Pins the version that served before the current one (from the history)."""
        read = self._route_to_update(tenant)
        route = read[0]
        previous = next((h.from_version for h in reversed(self.history(tenant))
                         if h.to_version == route.serving and h.from_version and h.from_version != route.serving),
                        None)
        if previous is None:
            raise FailedPrecondition(f"tenant {tenant!r} has no earlier serving version to roll back to")
        sha256 = self.version(tenant, previous).sha256
        return self._update_route(
            tenant, "rollback", lambda r: r.with_changes(serving=previous, pinned=True, serving_sha256=sha256),
            actor, reason, read=read)

    def start_rollout(self, tenant: str, version: str, percent: float | None = None, shadow: bool = False,
                      actor: str | None = None, reason: str = "") -> RouteRecord:
        """A canary (`percent` of traffic answered by `version`) or a shadow (a copy of traffic)."""
        if shadow == (percent is not None):
            raise InvalidArgument("a rollout is either --percent P (canary) or --shadow")
        if percent is not None:
            percent = canary_percent(percent)  # to the routers' resolution, 0.01 %
        record = self.version(tenant, version)  # NotFound for an unknown version
        sha256 = record.sha256

        def start(route: RouteRecord) -> RouteRecord:
            if version == route.serving:
                raise FailedPrecondition(f"{version!r} already serves tenant {tenant!r}")
            if route.in_rollout - {version}:
                raise FailedPrecondition(f"tenant {tenant!r} already has a rollout of "
                                         f"{sorted(route.in_rollout)[0]!r}: promote or abort it first")
            _check_same_shape(tenant, record, self.version(tenant, route.serving))
            if shadow:
                return route.with_changes(shadow=version, shadow_sha256=sha256, canary=None, canary_percent=None,
                                          rollout_id=new_event_id())
            return route.with_changes(canary=version, canary_sha256=sha256, canary_percent=float(percent), shadow=None,
                                      rollout_id=new_event_id())

        action = "shadow" if shadow else f"canary {percent:g}%"
        return self._update_route(tenant, action, start, actor, reason, to_version=version)

    def promote(self, tenant: str, actor: str | None = None, reason: str = "") -> RouteRecord:
        """The rollout's version serves (pinned unless it is the newest); the rollout ends."""
        read, version = self._rollout_read(tenant, "promote")
        return self._update_route(
            tenant, "promote", lambda r: _ended(r, version).with_changes(
                serving=version, pinned=version != r.newest, serving_sha256=r.artifact_of(version)),
            actor, reason, read=read)

    def abort(self, tenant: str, actor: str | None = None, reason: str = "") -> RouteRecord:
        read, version = self._rollout_read(tenant, "abort")
        return self._update_route(tenant, "abort", lambda r: _ended(r, version), actor, reason, to_version=version,
                                  read=read)

    def set_shard_size(self, tenant: str, shard_size: int | None) -> RouteRecord:
        """Gives a hot tenant a larger shard (None: back to the routers' default)."""
        if shard_size is not None and not 1 <= shard_size <= MAX_SHARD_SIZE:
            raise InvalidArgument(f"shard size must be between 1 and {MAX_SHARD_SIZE}, got {shard_size}")
        return self._update_route(tenant, "", lambda r: r.with_changes(shard_size=shard_size))

    def set_limits(self, tenant: str, rate: float | None = None, burst: float | None = None,
                   max_inflight: int | None = None) -> RouteRecord:
        """Sets the tenant's load-shedding limits (per router); None = the routers' default for each.

        All three are written together: `set_limits(t)` returns the tenant to the defaults.
        """
        return self.change_limits(tenant, {"rate_limit": rate, "burst": burst, "max_inflight": max_inflight})

    def change_limits(self, tenant: str, changes: dict[str, float | int | None]) -> RouteRecord:
        """Changes only the limits named in `changes` (rate_limit, burst, max_inflight; None = the
        routers' default), keeping the others, in one compare-and-swap on the route."""
        unknown = set(changes) - {"rate_limit", "burst", "max_inflight"}
        if unknown:
            raise InvalidArgument(f"unknown limits {sorted(unknown)}: rate_limit, burst or max_inflight")
        rate, burst, max_inflight = (changes.get(name) for name in ("rate_limit", "burst", "max_inflight"))
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise InvalidArgument(f"rate limit must be a positive number of requests per second, got {rate}")
        if burst is not None and not (burst >= 1 and math.isfinite(burst)):
            raise InvalidArgument(f"burst must be at least 1 request, got {burst}")
        if max_inflight is not None and not (isinstance(max_inflight, int) and max_inflight >= 1):
            raise InvalidArgument(f"max in-flight must be a whole number of at least 1, got {max_inflight}")
        values = {name: value if value is None or name == "max_inflight" else float(value)
                  for name, value in changes.items()}
        return self._update_route(tenant, "", lambda r: r.with_changes(**values))

    def delete_versions(self, tenant: str, records: list[VersionRecord], route_revision: int) -> None:
        """Removes version records, if the route is still at `route_revision` and keeps none of them,
        leaving each one's tombstone (RetiredRecord: the name stays its artifact's)."""
        route_key = self.keys.route(tenant)
        txn = self.client.transactions
        retired = utc_stamp()
        for start in range(0, len(records), _RETIRED_PER_TXN):  # one transaction per batch
            if start:
                failpoints.pause("between_retire_batches")
            ops = [op for r in records[start:start + _RETIRED_PER_TXN] for op in (
                txn.delete(self.keys.version(tenant, r.version)),
                txn.put(self.keys.retired_version(tenant, r.version), RetiredRecord(r.sha256, retired).to_json()))]
            with etcd_errors(self.client, f"deleting versions of {tenant}"):
                ok, _ = self.client.transaction(compare=[txn.mod(route_key) == route_revision], success=ops,
                                                failure=[])
            if not ok:
                error = Conflict(f"the route of {tenant!r} changed while collecting garbage ({start} of "
                                 f"{len(records)} versions removed); re-run")
                error.removed = start
                raise error

    def history_op(self, tenant: str, action: str, from_version: str, to_version: str, actor: str | None,
                    reason: str | None):
        record = HistoryRecord(at=utc_stamp(), actor=actor or default_actor(), action=action,
                               from_version=from_version, to_version=to_version, reason=reason or "")
        return self.client.transactions.put(self.keys.history_event(tenant, new_event_id()), record.to_json())

    # -- internals -------------------------------------------------------------------------
    def _sha256_of(self, tenant: str, version: str) -> str | None:
        """The artifact digest of a version, None if it has no record (the route is then
        written without one, and workers read the record themselves, which says NOT_FOUND)."""
        try:
            return self.version(tenant, version).sha256
        except NotFound:
            return None

    def _route_to_update(self, tenant: str) -> tuple[RouteRecord, int]:
        """The route and its revision, for a change decided on what it says: `_update_route(read=)`
        compares that revision, so a change since is a Conflict, never applied on top."""
        read = self.route(tenant)
        failpoints.pause("after_route_read")
        return read

    def _rollout_read(self, tenant: str, action: str) -> tuple[tuple[RouteRecord, int], str]:
        """(`_route_to_update`, the version of its rollout) for `action` (promote, abort): acts on
        the rollout it saw, or Conflict; FailedPrecondition when there is none."""
        read = self._route_to_update(tenant)
        version = read[0].canary or read[0].shadow
        if version is None:
            raise FailedPrecondition(f"tenant {tenant!r} has no rollout to {action}")
        return read, version

    def _update_route(self, tenant: str, action: str, change: Callable[[RouteRecord], RouteRecord],
                      actor: str | None = None, reason: str = "", to_version: str | None = None,
                      read: tuple[RouteRecord, int] | None = None) -> RouteRecord:
        """`read`: the route and revision the caller decided on (else read here); the write
        compares that revision, so a change since is a Conflict, never applied on top."""
        route, mod_revision = read if read is not None else self.route(tenant)
        new_route = change(route)
        if new_route.serving in new_route.in_rollout:  # a pin or unpin onto the rollout's version ends it:
            new_route = _ended(new_route, new_route.serving)  # a canary or shadow of what serves is no rollout
        if new_route.serving_sha256 is None:  # serving changed (or a route from an older tool)
            new_route = new_route.with_changes(serving_sha256=self._sha256_of(tenant, new_route.serving))
        failpoints.pause("before_route_write")
        key = self.keys.route(tenant)
        txn = self.client.transactions
        ops = [txn.put(key, new_route.to_json())]
        if action:
            ops.append(self.history_op(tenant, action, route.serving, to_version or new_route.serving, actor, reason))
        # Every version the new route names must still be registered when it is written: a
        # garbage collection that removed one since it was read (gc does not touch the route) fails
        # this write instead of leaving the tenant on a version with no record or artifact.
        named = sorted({new_route.serving, *new_route.in_rollout} - {""})
        doing = f"{action or 'update'} {tenant}"
        with etcd_errors(self.client, doing):
            ok, _ = self.client.transaction(
                compare=[txn.mod(key) == mod_revision, *(txn.version(self.keys.version(tenant, v)) > 0 for v in named)],
                success=ops, failure=[])
        if not ok:
            for version in named:
                self.version(tenant, version)  # NotFound: removed meanwhile
            raise Conflict(f"could not {doing}: the route of {tenant!r} changed concurrently "
                           f"(read at revision {mod_revision}); re-read and retry")
        return new_route


def next_route_on_register(old: RouteRecord | None, version: str, sha256: str) -> RouteRecord:
    """The route after `version` (artifact `sha256`) is registered: newest always, serving
    unless pinned."""
    if old is None:
        return RouteRecord(serving=version, newest=version, serving_sha256=sha256)
    if old.pinned:
        return old.with_changes(newest=version)
    return old.with_changes(serving=version, newest=version, serving_sha256=sha256)


def _check_same_shape(tenant: str, rollout: VersionRecord, serving: VersionRecord) -> None:
    """A rollout's version must take the rows the serving one takes and answer as many outputs: a
    caller sends one row width, so a canary of another width fails its whole share of the tenant's
    requests (or answers them in another shape) and a shadow every copy (changing the width is a pin,
    with the callers)."""
    if (rollout.num_features, rollout.num_classes) != (serving.num_features, serving.num_classes):
        raise FailedPrecondition(
            f"tenant {tenant!r} version {rollout.version!r} takes {rollout.num_features} features and answers "
            f"{rollout.num_classes} output(s) per row, but {serving.version!r}, which serves, takes "
            f"{serving.num_features} and answers {serving.num_classes}: callers send one row width and read one "
            f"answer shape, so a canary would fail (or answer in another shape) every request of its share and "
            f"a shadow would compare nothing; pin it to change what serves, with the callers")


def _ended(route: RouteRecord, version: str) -> RouteRecord:
    return route.with_changes(canary=None, canary_percent=None, shadow=None, rollout_id=None)
