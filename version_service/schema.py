"""The etcd schema of modelfleet: key layout, JSON records, identifier rules. One module owns it.

Layout under a prefix (default /modelfleet/v1, the v1 being the schema version):

    {prefix}/routes/{tenant}              RouteRecord   -- what serves a tenant; routers watch it
    {prefix}/versions/{tenant}/{version}  VersionRecord -- one registered model artifact
    {prefix}/workers/{worker_id}          WorkerRecord  -- a live worker, under its etcd lease
    {prefix}/drains/{worker_id}           DrainRecord   -- an operator took the worker out of shards
    {prefix}/history/{tenant}/{event_id}  HistoryRecord -- who changed what serves a tenant, when, why
    {prefix}/routers/{router_id}          RouterRecord  -- a live router, under its lease (admin tools)
    {prefix}/apikeys/{key_id}             ApiKeyRecord  -- a caller's key: its sha256 and its tenants
    {prefix}/gc                           CollectionRecord -- the garbage collector's guard
    {prefix}/retired/{tenant}/{version}   RetiredRecord -- a version gc removed; its name keeps its artifact;
                                                           workers watch it
    {prefix}/gc-pending/{artifact}        a timestamp   -- an artifact gc is deleting (the next one finishes)

Routers hold routes/, workers/ and drains/ in memory (one small record per tenant) and send the
serving artifact's digest with each request; workers read a versions/ record only when a request
comes without that digest (or to check one: worker.model_cache). Records are compact JSON; unknown fields are ignored
on read, so a newer writer does not break an older reader.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Collection, Mapping, TypeVar

from modelfleet.errors import FailedPrecondition, InvalidArgument
from sharding import Member

SCHEMA_VERSION = 1
DEFAULT_PREFIX = f"/modelfleet/v{SCHEMA_VERSION}"

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
ID_RULE = "[A-Za-z0-9._-]{1,128}, not '.' or '..'"


def is_valid_id(value: object) -> bool:
    """Whether `value` may be a tenant id, version or worker id (ID_RULE)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None and value not in (".", "..")


def validate_id(kind: str, value: str) -> str:
    """Returns value when it is a valid tenant id, version or worker id; else InvalidArgument.

    Identifiers become etcd key segments and log fields, never file paths, but the rule still
    keeps out '/', '..', whitespace and control characters at every entry point.
    """
    if not is_valid_id(value):
        shown = value if isinstance(value, str) and len(value) <= 64 else f"{str(value)[:64]}..."
        raise InvalidArgument(f"invalid {kind} {shown!r}: must be {ID_RULE}")
    return value


class Keys:
    """Builds and parses every etcd key; nothing else concatenates key strings."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = "/" + prefix.strip("/")

    @property
    def routes(self) -> str:
        return f"{self.prefix}/routes/"

    def route(self, tenant: str) -> str:
        return f"{self.routes}{tenant}"

    @property
    def all_versions(self) -> str:
        return f"{self.prefix}/versions/"

    def versions(self, tenant: str) -> str:
        return f"{self.all_versions}{tenant}/"

    def version(self, tenant: str, version: str) -> str:
        return f"{self.versions(tenant)}{version}"

    @property
    def retired(self) -> str:
        """Versions gc removed; workers watch it to drop what they hold of them (worker.retirements)."""
        return f"{self.prefix}/retired/"

    def retired_of_tenant(self, tenant: str) -> str:
        return f"{self.retired}{tenant}/"

    def retired_version(self, tenant: str, version: str) -> str:
        """A version gc removed (RetiredRecord): its name stays taken by its artifact, until a
        later gc removes the tombstone (older than --tombstone-days)."""
        return f"{self.retired_of_tenant(tenant)}{version}"

    def retired_of_key(self, key: str) -> tuple[str, str] | None:
        """(tenant, version) of a retired_version key; None for a key not of that shape."""
        tenant, _, version = key[len(self.retired):].partition("/")
        return (tenant, version) if tenant and version else None

    @property
    def gc_pending(self) -> str:
        """Artifacts a garbage collection is deleting (value: when it decided to), so a collection
        that could not reach the store leaves them for the next one, not orphaned for good."""
        return f"{self.prefix}/gc-pending/"

    def gc_pending_artifact(self, artifact: str) -> str:
        return f"{self.gc_pending}{artifact}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}/workers/"

    def worker(self, worker_id: str) -> str:
        return f"{self.workers}{worker_id}"

    @property
    def drains(self) -> str:
        return f"{self.prefix}/drains/"

    def drain(self, worker_id: str) -> str:
        return f"{self.drains}{worker_id}"

    @property
    def gc_guard(self) -> str:
        """Written when a garbage collection starts and ends deleting artifacts (CollectionRecord)."""
        return f"{self.prefix}/gc"

    def history(self, tenant: str) -> str:
        return f"{self.prefix}/history/{tenant}/"

    def history_event(self, tenant: str, event_id: str) -> str:
        return f"{self.history(tenant)}{event_id}"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}/apikeys/"

    def api_key(self, key_id: str) -> str:
        return f"{self.api_keys}{key_id}"

    def key_of_api_key(self, key: str) -> str:
        return key[len(self.api_keys):]

    @property
    def routers(self) -> str:
        return f"{self.prefix}/routers/"

    def router(self, router_id: str) -> str:
        return f"{self.routers}{router_id}"

    def tenant_of_route(self, key: str) -> str:
        return key[len(self.routes):]

    def worker_of_key(self, key: str) -> str:
        return key[len(self.workers):]

    def worker_of_drain(self, key: str) -> str:
        return key[len(self.drains):]


R = TypeVar("R", bound="_Record")


class CorruptRecord(FailedPrecondition):
    """A value in etcd that is not the record its key holds. modelfleet never writes one (a hand
    edit, another program on the prefix): a reader that can skip it does (the routing cache, gc's
    tombstone dating); any other says which record, never a traceback nor, inside
    `etcd_errors`, a JSON error taken for an unreachable etcd."""


class _Record:
    __slots__ = ()

    def to_json(self) -> str:
        doc = {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls: type[R], raw: bytes | str) -> R:
        """The record `raw` holds; CorruptRecord when it is not one (not JSON, not an object, a
        field missing)."""
        try:
            doc: dict[str, Any] = json.loads(raw)
            if not isinstance(doc, dict):
                raise TypeError(f"a JSON {type(doc).__name__}, not an object")
            known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
            return cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptRecord(f"a {cls.__name__} in etcd is not valid: {exc}") from None


@dataclass(frozen=True, slots=True)
class CollectionRecord(_Record):
    """The garbage collector's guard (Keys.gc_guard): `deleting`, under a lease, while it deletes
    artifacts; quiet, without one, after (version_service.collection_guard says why). `at` and
    `actor` are for operators."""
    deleting: bool
    at: str
    actor: str = ""


CANARY_BUCKETS = 10_000  # routers split each tenant's keys into this many: a canary's resolution is 0.01 %


def canary_percent(value: float) -> float:
    """A canary's share of traffic as routers apply it: `value` % to the nearest 0.01 (one bucket of
    CANARY_BUCKETS), from 0.01 to 100; else InvalidArgument. A share below one bucket cannot be
    kept (1e-9 % took every key of bucket 0: 0.01 %), so it is refused, not rounded up."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 100):
        raise InvalidArgument(f"a canary's percent must be from 0.01 to 100, got {value}")
    rounded = round(value, 2)
    if rounded == 0:
        raise InvalidArgument(f"a canary's percent must be from 0.01 to 100 (its resolution), got {value:g}")
    return rounded


def canary_buckets(percent: float) -> int:
    """How many of CANARY_BUCKETS a canary of `percent` takes: rounded, since 0.07 * 100 is
    7.000000000000001 in floating point (counted as 8 buckets, 0.08 %, it was)."""
    return round(percent * (CANARY_BUCKETS / 100))


_DIGESTS = (("serving", "serving_sha256"), ("canary", "canary_sha256"), ("shadow", "shadow_sha256"))


@dataclass(frozen=True, slots=True)
class RouteRecord(_Record):
    """Which version serves a tenant. `serving` is `newest` unless `pinned`.

    A rollout adds either a canary (`canary` answers `canary_percent` % of the tenant's traffic)
    or a shadow (`shadow` gets a copy of the traffic; its answers are compared, never returned).
    Routers hold one of these per tenant, so it stays small (slots, short JSON).

    Load-shedding limits, each None = the routers' defaults (--tenant-rate-limit, --tenant-burst,
    --tenant-max-inflight): `rate_limit` requests per second and `burst` (token-bucket size; unset
    with a rate = one second of it) per router, `max_inflight` requests in flight per router.

    `serving_sha256` is the serving version's artifact digest, copied from its (immutable)
    version record by whoever changes `serving`. Routers send it with each request so that a
    worker loading the model needs no etcd read (see worker.model_cache); None (a route
    written by an older tool) only means the worker reads the version record itself.
    `canary_sha256` and `shadow_sha256` are the same for the rollout's version, so a canary or
    shadow that a worker has to load needs no etcd either (through an etcd outage too).
    `with_changes` drops each digest whenever its version changes without it, so none can ever
    name another version's artifact.

    `rollout_id` names one rollout: set afresh by every start (a new version, percentage or mode),
    dropped when it ends. Routers count each rollout's traffic for `rollout --status` under it, so a
    rollout of v2 at 5 % started after an earlier one at 5 % was aborted starts from zero.
    """

    serving: str
    newest: str
    pinned: bool = False
    shard_size: int | None = None
    canary: str | None = None
    canary_percent: float | None = None
    shadow: str | None = None
    rate_limit: float | None = None
    burst: float | None = None
    max_inflight: int | None = None
    serving_sha256: str | None = None
    canary_sha256: str | None = None
    shadow_sha256: str | None = None
    rollout_id: str | None = None

    def with_changes(self, **changes: Any) -> "RouteRecord":
        for name, digest in _DIGESTS:
            if changes.get(name, getattr(self, name)) != getattr(self, name) and digest not in changes:
                changes[digest] = None
        return replace(self, **changes)

    def artifact_of(self, version: str) -> str | None:
        """The artifact digest of `version` as the route names it, None when it names none."""
        if version == self.serving:
            return self.serving_sha256
        if version == self.canary:
            return self.canary_sha256
        return self.shadow_sha256 if version == self.shadow else None

    @property
    def in_rollout(self) -> set[str]:
        return {v for v in (self.canary, self.shadow) if v}


@dataclass(frozen=True, slots=True)
class VersionRecord(_Record):
    """One registered model version. `artifact` is relative to the model store root."""

    version: str
    artifact: str
    sha256: str
    num_features: int
    num_classes: int
    bytes: int
    created: str
    objective: str = ""


@dataclass(frozen=True, slots=True)
class RetiredRecord(_Record):
    """What is left of a version gc removed (Keys.retired_version): its artifact's digest. A version
    name always means one model, so every cache keyed by (tenant, version) (workers, routers'
    OIP records) stays right: registering the name again is refused unless it is the same artifact.

    `retired` (utc_stamp, in every tombstone ever written) dates it: a gc removes tombstones older
    than its --tombstone-days (version_service.retention says why that is safe), and the name is
    free again. Workers drop what they hold of a version when its tombstone is written
    (worker.retirements), not when it goes."""

    sha256: str
    retired: str


def retired_conflict(tenant: str, version: str, retired: RetiredRecord, sha256: str) -> str | None:
    """Why `version` of `tenant` cannot be registered with `sha256` again, None when it can."""
    if retired.sha256 == sha256:
        return None
    return (f"tenant {tenant!r} version {version!r} was registered before with another artifact (sha256 "
            f"{retired.sha256[:12]}..., this one {sha256[:12]}...) and removed by gc at {retired.retired}; a version "
            f"name always means one model: register this one under a new version")


def utc_stamp(timespec: str = "milliseconds") -> str:
    """Now, as every record stores a time: UTC in ISO 8601, so stamps sort as strings."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


def started_stamp() -> str:
    """A process's `started` field (workers and routers): UTC to the microsecond, because routers
    tell one worker process from the next by it, and a restart within the same second must count."""
    return utc_stamp("microseconds")


@dataclass(frozen=True)
class WorkerRecord(_Record):
    """A live worker; the key lives under the worker's lease and vanishes when it dies.

    `joining` is true while a new worker warms the models it is about to own (make-before-break):
    routers keep it out of shards until it flips to false. `started` (`started_stamp`) tells one
    process from the next under the same id and address.
    """

    worker_id: str
    address: str
    zone: str = "default"
    joining: bool = False
    started: str = ""


@dataclass(frozen=True)
class HistoryRecord(_Record):
    """One change of what serves a tenant: pin, unpin, rollback, rollout start/promote/abort."""

    at: str
    actor: str
    action: str
    from_version: str
    to_version: str
    reason: str = ""


@dataclass(frozen=True)
class ApiKeyRecord(_Record):
    """A caller's API key. Only the sha256 of its secret is stored, never the secret.

    `tenants` lists what the key may call ("*" = every tenant); `admin` keys may also use the
    router's admin API.
    """

    key_id: str
    sha256: str
    tenants: list[str]
    created: str
    actor: str = ""
    admin: bool = False


@dataclass(frozen=True)
class RouterRecord(_Record):
    """A live router. `shard_size` is its --shard-size (a tenant's shard when its route names
    none): admin commands plan with what the routers route with, not with a default of their own."""
    router_id: str
    address: str
    started: str = ""
    shard_size: int | None = None


@dataclass(frozen=True)
class DrainRecord(_Record):
    """An operator's drain of a worker. Not leased: it survives the worker's restarts."""

    since: str
    actor: str = ""
    reason: str = ""


def live_members(workers: Mapping[str, WorkerRecord], drained: Collection[str]) -> list[Member]:
    """The workers shards are computed over: registered, not joining, not drained; sorted by id.

    Router, CLI and plans all call this, so they agree on the live set by construction.
    """
    return sorted((Member(w.worker_id, w.zone) for w in workers.values()
                   if not w.joining and w.worker_id not in drained), key=lambda m: m.worker_id)
