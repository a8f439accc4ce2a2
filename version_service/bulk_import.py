"""Bulk import: register thousands of tenant versions from a manifest, resumably.

Two phases, timed separately:
1. artifacts: every distinct file is hashed; new ones are checked (child-process pool) and
   copied into the content-addressed store, as `register` does (version_service.artifact_intake).
   Idempotent: a stored artifact is not re-checked.
2. registration: rows go to etcd in batches, one transaction each (versions, routes, history),
   comparing every key it read. Rows already registered with the same sha256 are skipped, so
   re-running a killed import resumes where it stopped; the same version with a different
   sha256 stops the import loudly, naming the manifest line.

Manifest: CSV with a header `tenant,version,artifact` or JSON lines with those keys; an artifact
is a path (relative to the manifest's directory) or a file:// URI.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from modelfleet.artifact_check import check_many
from modelfleet.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument
from version_service.artifact_intake import Progress, TakenIn, take_in
from version_service.collection_guard import quiet_revision, restored_after_collection
from version_service.etcd_client import MAX_TXN_OPS, etcd_errors
from version_service.registry import Registry, next_route_on_register
from version_service.schema import RetiredRecord, RouteRecord, VersionRecord, retired_conflict, validate_id

# A record takes 3 reads (route, version, tombstone), then up to 3 puts (version, history, route)
# and 2 compares (version absent, route unchanged) besides the batch's collection guard: compares
# count apart, 2 * 42 + 1 is well within MAX_TXN_OPS. 42 a transaction, where it was 40 for no
# reason but a round number: etcd takes a transaction of exactly MAX_TXN_OPS operations.
RECORDS_PER_TXN = MAX_TXN_OPS // 3
BATCH_ATTEMPTS = 5


@dataclass(frozen=True)
class ManifestRow:
    line: int
    tenant: str
    version: str
    source: Path


@dataclass
class ImportResult:
    rows: int = 0
    registered: int = 0
    already_registered: int = 0
    artifacts: int = 0
    artifacts_new: int = 0
    artifact_seconds: float = 0.0
    registration_seconds: float = 0.0
    rejected: list[str] = field(default_factory=list)


def read_manifest(path: Path) -> list[ManifestRow]:
    base = path.parent
    rows: list[ManifestRow] = []
    try:
        with open(path, newline="") as fh:
            first = fh.readline()
            fh.seek(0)
            if first.lstrip().startswith("{"):
                records = ((n, json.loads(line)) for n, line in enumerate(fh, 1) if line.strip())
            else:
                records = enumerate(csv.DictReader(fh), 2)
            for line, record in records:
                rows.append(_row(line, record, base, path))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read manifest {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: not JSON lines: {exc}") from None
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise InvalidArgument(f"{path}: not a usable CSV manifest: {exc}") from None
    if not rows:
        raise InvalidArgument(f"manifest {path} has no rows (CSV header: tenant,version,artifact)")
    return rows


def _row(line: int, record: dict, base: Path, manifest: Path) -> ManifestRow:
    try:
        tenant, version, artifact = record["tenant"], record["version"], record["artifact"]
    except (KeyError, TypeError):
        raise InvalidArgument(f"{manifest}:{line}: needs tenant, version and artifact") from None
    where = f"{manifest}:{line}"
    if not all(isinstance(value, str) and value for value in (tenant, version, artifact)):  # a short CSV row: None
        raise InvalidArgument(f"{where}: tenant, version and artifact must each be a non-empty string")
    try:
        validate_id("tenant id", tenant)
        validate_id("version", version)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    if artifact.startswith("file://"):
        source = Path(unquote(urlparse(artifact).path))
    elif "://" in artifact:
        raise InvalidArgument(f"{where}: artifact {artifact!r}: only paths and file:// URIs can be imported")
    else:
        source = Path(artifact) if Path(artifact).is_absolute() else base / artifact
    return ManifestRow(line, tenant, version, source)


def import_manifest(registry: Registry, rows: list[ManifestRow], actor: str, on_progress: Progress | None = None,
                    batch_size: int = RECORDS_PER_TXN, reason: str = "import") -> ImportResult:
    result = ImportResult(rows=len(rows))
    progress = on_progress or (lambda phase, done, total: None)

    started = time.perf_counter()
    guard = quiet_revision(registry.client, registry.keys)  # before any "already stored" (collection_guard)
    stored = _store_artifacts(registry, rows, result, progress)
    result.artifact_seconds = time.perf_counter() - started

    started = time.perf_counter()
    done = 0
    for start in range(0, len(rows), batch_size):
        batch = [r for r in rows[start:start + batch_size] if r.source in stored]
        guard = _register_batch(registry, batch, stored, actor, result, guard, reason)
        done += len(rows[start:start + batch_size])
        progress("registering", done, len(rows))
    result.registration_seconds = time.perf_counter() - started
    return result


CHANGED = "{}: changed while it was being imported; import it again"  # a rejected row's reason


def _store_artifacts(registry: Registry, rows: list[ManifestRow], result: ImportResult,
                     progress: Progress) -> dict[Path, TakenIn]:
    """Every usable source, taken into the store (version_service.artifact_intake); the others are
    rejected."""
    if registry.store is None:
        raise FailedPrecondition("importing needs a model store (--store / MODELFLEET_STORE)")
    sources = list(dict.fromkeys(r.source for r in rows))
    result.artifacts = len(sources)
    stored: dict[Path, TakenIn] = {}
    for source, outcome in take_in(registry.store, sources, check_many, before_store="before_import_store",
                                   on_progress=progress).items():
        if isinstance(outcome, TakenIn):
            stored[source] = outcome
            result.artifacts_new += outcome.new
        else:
            result.rejected.append(CHANGED.format(source) if isinstance(outcome, Conflict) else str(outcome))
    return stored


def _register_batch(registry: Registry, batch: list[ManifestRow], stored, actor: str, result: ImportResult,
                    guard: int, reason: str = "import") -> int:
    """Returns the collection guard's revision since which the artifacts are known to be stored:
    `guard` given, a newer one after a collection failed the write (collection_guard)."""
    client, keys = registry.client, registry.keys
    txn = client.transactions
    for _ in range(BATCH_ATTEMPTS):
        tenants = list(dict.fromkeys(r.tenant for r in batch))
        pairs = list(dict.fromkeys((r.tenant, r.version) for r in batch))
        version_keys = [keys.version(t, v) for t, v in pairs]
        with etcd_errors(client, "reading a batch of the import"):
            _, reads = client.transaction(compare=[], success=[txn.get(keys.route(t)) for t in tenants]
                                          + [txn.get(k) for k in version_keys]
                                          + [txn.get(keys.retired_version(t, v)) for t, v in pairs], failure=[])
        routes = {t: (RouteRecord.from_json(r[0][0]), r[0][1].mod_revision) if r else (None, 0)
                  for t, r in zip(tenants, reads[:len(tenants)])}
        version_reads = reads[len(tenants):len(tenants) + len(pairs)]
        existing = {k: VersionRecord.from_json(r[0][0]) for k, r in zip(version_keys, version_reads) if r}
        retired = {k: RetiredRecord.from_json(r[0][0])
                   for k, r in zip(version_keys, reads[len(tenants) + len(pairs):]) if r}
        compare, ops, registered, skipped = [], [], 0, 0
        current = {t: route for t, (route, _) in routes.items()}
        for row in batch:
            taken = stored[row.source]
            sha = taken.sha256
            key = keys.version(row.tenant, row.version)
            if key in existing:
                if existing[key].sha256 != sha:
                    raise AlreadyExists(
                        f"line {row.line}: tenant {row.tenant!r} version {row.version!r} is already registered "
                        f"with a different artifact (sha256 {existing[key].sha256[:12]}..., manifest {sha[:12]}...)")
                skipped += 1
                continue
            if key in retired and (why := retired_conflict(row.tenant, row.version, retired[key], sha)):
                raise AlreadyExists(f"line {row.line}: {why}")
            record = taken.record(row.version)
            existing[key] = record
            compare.append(txn.version(key) == 0)
            ops.append(txn.put(key, record.to_json()))
            old = current[row.tenant]
            current[row.tenant] = next_route_on_register(old, row.version, sha)
            if old is None or old.serving != current[row.tenant].serving:
                ops.append(registry.history_op(row.tenant, "register", old.serving if old else "",
                                               current[row.tenant].serving, actor, reason))
            registered += 1
        for tenant, (route, mod_revision) in routes.items():
            if current[tenant] is not route:
                key = keys.route(tenant)
                compare.append(txn.mod(key) == mod_revision if route is not None else txn.version(key) == 0)
                ops.append(txn.put(key, current[tenant].to_json()))
        if not ops:
            result.already_registered += skipped
            return guard
        compare.append(txn.mod(keys.gc_guard) == guard)
        with etcd_errors(client, "writing a batch of the import"):
            ok, _ = client.transaction(compare=compare, success=ops, failure=[])
        if ok:
            result.registered += registered
            result.already_registered += skipped
            return guard
        guard = restored_after_collection(client, keys, registry.store, guard,
                                          [stored[row.source] for row in batch])
    raise Conflict("the import kept racing other registry writes on the same tenants; re-run it to resume")

