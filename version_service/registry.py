"""The model registry: register versions, pin and unpin, list — every write a CAS transaction.

Invariants kept here:
- a tenant's route exists iff it has at least one registered version;
- `route.newest` is the most recently registered version; `route.serving` equals it unless
  `route.pinned`;
- a version record never changes once written (same version + same sha256 is an idempotent
  no-op, a different sha256 is AlreadyExists);
- every write compares the revisions it read, so two admins never silently overwrite each
  other: register re-reads and retries (its result does not depend on who wins), pin and unpin
  fail with Conflict when the route changed after they read it.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import lightgbm

from modelfleet.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, NotFound
from modelfleet.store import LocalStore
from version_service.etcd_client import EtcdClient, etcd_errors
from version_service.schema import Keys, RouteRecord, VersionRecord, validate_id

_REGISTER_ATTEMPTS = 8


def inspect_model(path: Path) -> tuple[int, int, str]:
    """(num_features, num_classes, objective) of a LightGBM model file; FailedPrecondition if unparseable."""
    try:
        booster = lightgbm.Booster(model_file=str(path))
    except lightgbm.basic.LightGBMError as exc:
        raise FailedPrecondition(f"{path} is not a LightGBM model: {exc}") from None
    try:
        objective = str(booster.params.get("objective", "")) if booster.params else ""
        if not objective:
            for line in path.read_text(errors="replace").splitlines()[:40]:
                if line.startswith("objective="):
                    objective = line.split("=", 1)[1].split()[0]
                    break
        return booster.num_feature(), booster.num_model_per_iteration(), objective
    finally:
        booster.free_network()
        del booster


class Registry:
    def __init__(self, client: EtcdClient, keys: Keys, store: LocalStore | None = None) -> None:
        self.client = client
        self.keys = keys
        self.store = store

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

    # -- writes ----------------------------------------------------------------------------
    def register(self, tenant: str, version: str, model_file: str | Path) -> tuple[VersionRecord, bool]:
        """Copies the artifact into the store and records it; returns (record, created).

        The new version becomes serving unless the tenant is pinned.
        """
        validate_id("tenant id", tenant)
        validate_id("version", version)
        if self.store is None:
            raise FailedPrecondition("registering needs a model store (--store / MODELFLEET_STORE)")
        path = Path(model_file)
        if not path.is_file():
            raise InvalidArgument(f"model file {str(path)!r} does not exist")
        num_features, num_classes, objective = inspect_model(path)
        stored = self.store.put_file(path)
        record = VersionRecord(
            version=version, artifact=stored.artifact, sha256=stored.sha256, num_features=num_features,
            num_classes=num_classes, bytes=stored.size, objective=objective,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        )
        route_key, version_key = self.keys.route(tenant), self.keys.version(tenant, version)
        txn = self.client.transactions
        for _ in range(_REGISTER_ATTEMPTS):
            with etcd_errors(self.client, f"registering {tenant} version {version}"):
                raw_version, _ = self.client.get(version_key)
                if raw_version is not None:
                    existing = VersionRecord.from_json(raw_version)
                    if existing.sha256 == record.sha256:
                        return existing, False
                    raise AlreadyExists(
                        f"tenant {tenant!r} version {version!r} is already registered with a different "
                        f"artifact (sha256 {existing.sha256[:12]}..., this file {record.sha256[:12]}...)")
                raw_route, route_meta = self.client.get(route_key)
                if raw_route is None:
                    route = RouteRecord(serving=version, newest=version)
                    route_unchanged = txn.version(route_key) == 0
                else:
                    old = RouteRecord.from_json(raw_route)
                    route = RouteRecord(serving=old.serving if old.pinned else version, newest=version,
                                        pinned=old.pinned, shard_size=old.shard_size)
                    route_unchanged = txn.mod(route_key) == route_meta.mod_revision
                ok, _ = self.client.transaction(
                    compare=[txn.version(version_key) == 0, route_unchanged],
                    success=[txn.put(version_key, record.to_json()), txn.put(route_key, route.to_json())],
                    failure=[],
                )
            if ok:
                return record, True
        raise Conflict(f"could not register {tenant!r} version {version!r}: the route kept changing; retry")

    def pin(self, tenant: str, version: str) -> RouteRecord:
        """Serves `version` until unpinned, whatever is registered later."""
        self.version(tenant, version)  # NotFound for an unknown version
        return self._update_route(tenant, lambda r: RouteRecord(serving=version, newest=r.newest, pinned=True,
                                                               shard_size=r.shard_size), f"pin {tenant} to {version}")

    def unpin(self, tenant: str) -> RouteRecord:
        """Back to serving the newest registered version."""
        return self._update_route(tenant, lambda r: RouteRecord(serving=r.newest, newest=r.newest, pinned=False,
                                                               shard_size=r.shard_size), f"unpin {tenant}")

    def set_shard_size(self, tenant: str, shard_size: int | None) -> RouteRecord:
        """Gives a hot tenant a larger shard (None: back to the routers' default)."""
        if shard_size is not None and not 1 <= shard_size <= 1024:
            raise InvalidArgument(f"shard size must be between 1 and 1024, got {shard_size}")
        return self._update_route(tenant, lambda r: RouteRecord(serving=r.serving, newest=r.newest, pinned=r.pinned,
                                                               shard_size=shard_size),
                                  f"set the shard size of {tenant} to {shard_size or 'default'}")

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

    def _update_route(self, tenant: str, change, doing: str) -> RouteRecord:
        route, mod_revision = self.route(tenant)
        new_route = change(route)
        key = self.keys.route(tenant)
        txn = self.client.transactions
        with etcd_errors(self.client, doing):
            ok, _ = self.client.transaction(compare=[txn.mod(key) == mod_revision],
                                            success=[txn.put(key, new_route.to_json())], failure=[])
        if not ok:
            raise Conflict(f"could not {doing}: the route of {tenant!r} changed concurrently "
                           f"(read at revision {mod_revision}); re-read and retry")
        return new_route
