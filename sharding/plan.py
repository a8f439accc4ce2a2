"""What a fleet change does to every tenant's shard, before it is made. Pure functions, no I/O.

``plan_change(tenants, members, draining, sizes, default_k, change)`` computes every tenant's
shard before and after ``change`` (workers added, removed, drained or undrained; per-tenant
shard sizes set) with ``fleet_shards``, and diffs the two as per-tenant worker bitmasks:

* a *placement* is one (tenant, worker) pair of a shard;
* ``moved_placements`` are placements present before and gone after (the worker is no longer in
  that tenant's shard); ``warmups`` are placements present after and not before, and
  ``promoted`` the members already in a shard that become its first (they take the tenant's
  traffic): together (``to_warm``) where a make-before-break rollout must load the tenant's
  model before the change is applied;
* ``tenants_changed`` counts tenants whose shard *set* changes (order-only changes, possible
  with zones, do not count: they move no model).

Semantics of the state: ``members`` are all registered workers; the live set that shards are
computed from is ``members`` minus ``draining`` (a draining worker keeps existing, and is
listed in ``per_worker``, but holds no placements). ``sizes`` overrides the shard size of some
tenants; every other tenant uses ``default_k``. Overrides for tenants not in ``tenants`` are
ignored (the registry may know tenants the caller did not list).

A change is applied in a fixed order, each step validated against the state left by the
previous one: add, remove, drain, undrain, set_size. So "remove w1 and drain w1" fails (w1 is
gone by the time it is drained), and removing a draining worker also forgets its drain.

Invariants (tests/test_shard_plan_report.py): the per-tenant result equals ``shard_for``
before and after; adding one worker moves ~1/(N+1) of placements, all warm-ups on the new
worker; removing one moves exactly the placements it held; raising one tenant's size from
k to k' warms exactly k' - k placements for that tenant and moves nothing else (prefix rule).

Cost: two ``fleet_shards`` calls (one plus a slice when only sizes change) and O(T x words)
bitmask arithmetic; 100k tenants x 64 workers plans in well under a second. Only the warm-up
list is materialised per placement in Python.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sharding.fleet import fleet_shards
from sharding.member import MAX_SHARD_SIZE, Member

WARMUPS_IN_JSON = 1000


@dataclass(frozen=True)
class FleetChange:
    """One planned change to the fleet. Fields accept any iterable; they are stored as tuples."""

    add: tuple[Member, ...] = ()              # --add-worker ID[@zone]
    remove: tuple[str, ...] = ()              # --remove-worker ID
    drain: tuple[str, ...] = ()               # --drain ID: leaves shards like remove, the worker stays registered
    undrain: tuple[str, ...] = ()             # --undrain ID
    set_size: tuple[tuple[str, int], ...] = ()  # --set-size TENANT K (K >= 1)

    def __post_init__(self) -> None:
        for name in ("add", "remove", "drain", "undrain"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "set_size", tuple(tuple(p) for p in self.set_size))

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.drain or self.undrain or self.set_size)

    @staticmethod
    def parse_worker(spec: str) -> Member:
        """Parse ``ID`` or ``ID@ZONE`` (as given to --add-worker) into a Member.

        Raises ValueError naming what is wrong: empty id or zone, more than one '@', whitespace.
        """
        if not isinstance(spec, str):
            raise ValueError(f"worker spec must be a string like 'w7' or 'w7@zone-b', got {spec!r}")
        if not spec or spec != spec.strip() or any(c.isspace() for c in spec):
            raise ValueError(f"worker spec {spec!r} must be non-empty and contain no whitespace "
                             "(expected 'ID' or 'ID@ZONE')")
        if spec.count("@") > 1:
            raise ValueError(f"worker spec {spec!r} has more than one '@' (expected 'ID' or 'ID@ZONE')")
        worker_id, at, zone = spec.partition("@")
        if not worker_id:
            raise ValueError(f"worker spec {spec!r} has an empty worker id (expected 'ID' or 'ID@ZONE')")
        if at and not zone:
            raise ValueError(f"worker spec {spec!r} has an empty zone after '@' (expected 'ID@ZONE')")
        return Member(worker_id, zone) if at else Member(worker_id)


@dataclass(frozen=True)
class ShardPlan:
    """The effect of one FleetChange on every tenant's shard (see the module docstring)."""

    tenants: int
    placements_before: int
    placements_after: int
    moved_placements: int                     # (tenant, worker) present before, gone after
    tenants_changed: int                      # tenants whose shard set changes
    per_worker: dict[str, tuple[int, int]]    # worker_id -> (tenants before, tenants after); every worker in either state
    warmups: list[tuple[str, str]] = field(repr=False)  # (tenant, worker) new after: load before switching
    short_shard_tenants: int                  # after the change: tenants whose k exceeds the live workers
    promoted: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (tenant, worker) becomes first

    @property
    def to_warm(self) -> list[tuple[str, str]]:
        """Every (tenant, worker) a make-before-break apply loads first: new placements and new first members."""
        return self.warmups + self.promoted

    @property
    def moved_fraction(self) -> float:
        """moved_placements / placements_before (0.0 when there were none)."""
        return self.moved_placements / self.placements_before if self.placements_before else 0.0

    def to_json(self) -> dict:
        """JSON-serialisable dict; warm-ups as a count plus the first WARMUPS_IN_JSON entries."""
        return {
            "tenants": self.tenants,
            "placements_before": self.placements_before,
            "placements_after": self.placements_after,
            "moved_placements": self.moved_placements,
            "moved_fraction": self.moved_fraction,
            "tenants_changed": self.tenants_changed,
            "short_shard_tenants": self.short_shard_tenants,
            "per_worker": {w: {"before": b, "after": a} for w, (b, a) in self.per_worker.items()},
            "warmups": {
                "count": len(self.to_warm),
                "new_first_members": len(self.promoted),
                "entries": [[t, w] for t, w in self.to_warm[:WARMUPS_IN_JSON]],
                "truncated": len(self.to_warm) > WARMUPS_IN_JSON,
            },
        }


def plan_change(tenants: Sequence[str], members: Sequence[Member], draining: Collection[str],
                sizes: Mapping[str, int], default_k: int, change: FleetChange) -> ShardPlan:
    """Plan ``change`` against the state (members, draining, sizes, default_k) for ``tenants``.

    Raises ValueError for: a duplicate tenant or worker id, a draining id that is not a
    member, default_k or any size < 1, adding an id that exists, removing / draining /
    undraining an unknown worker, draining a draining worker, undraining one that is not
    draining, and set_size for an unlisted tenant or twice for one tenant.
    """
    tenants = list(tenants)
    members = list(members)
    t = len(tenants)
    _check_size("default_k", default_k)
    for tenant, k in sizes.items():
        _check_size(f"size of tenant {tenant!r}", k)

    ids = [m.worker_id for m in members]
    if len(set(ids)) != len(ids):
        dup = next(w for i, w in enumerate(ids) if w in ids[:i])
        raise ValueError(f"duplicate worker id {dup!r} in members")
    drain_before = set(draining)
    unknown = sorted(drain_before - set(ids))
    if unknown:
        raise ValueError(f"draining names worker(s) that are not members: {', '.join(map(repr, unknown))}")

    after_members, drain_after = _apply_workers(members, drain_before, change)

    index = dict(zip(tenants, range(t)))
    if len(index) != t:
        dup = next(x for x, n in Counter(tenants).items() if n > 1)
        raise ValueError(f"duplicate tenant id {dup!r} in tenants")
    k_before = np.full(t, default_k, dtype=np.int64)
    if sizes:
        _apply_sizes(k_before, index, sizes.items())
    k_after = k_before
    if change.set_size:
        seen: set[str] = set()
        for tenant, k in change.set_size:
            if tenant not in index:
                raise ValueError(f"set_size names tenant {tenant!r}, which is not among the tenants")
            if tenant in seen:
                raise ValueError(f"set_size names tenant {tenant!r} twice")
            seen.add(tenant)
            _check_size(f"set_size for tenant {tenant!r}", k)
        k_after = k_before.copy()
        _apply_sizes(k_after, index, change.set_size)

    # One id space for both states: registered members, then added ones.
    universe = ids + [m.worker_id for m in change.add]
    uid = {w: i for i, w in enumerate(universe)}
    live_before = [m for m in members if m.worker_id not in drain_before]
    live_after = [m for m in after_members if m.worker_id not in drain_after]
    map_before = np.array([uid[m.worker_id] for m in live_before], dtype=np.int64)
    map_after = np.array([uid[m.worker_id] for m in live_after], dtype=np.int64)

    sh_before = fleet_shards(tenants, live_before, k_before)
    if set(live_before) == set(live_after):
        # Same live set (ids and zones): only tenants whose size changed can differ.
        sh_after = _resize_only(tenants, live_before, sh_before, k_before, k_after)
        map_after = map_before
    else:
        sh_after = fleet_shards(tenants, live_after, k_after)

    d = diff_shards(sh_before, map_before, sh_after, map_after, len(universe))
    warm_rows, warm_cols = np.nonzero(d.new_slots)
    warm_workers = d.after_uid[warm_rows, warm_cols]
    warmups = [(tenants[r], universe[w]) for r, w in zip(warm_rows.tolist(), warm_workers.tolist())]
    # A member already in the shard that becomes its first takes the tenant's traffic (affinity)
    # and may never have loaded the model: apply warms it too (modelfleet.rebalance.warmups_for).
    promoted: list[tuple[str, str]] = []
    if d.after_uid.shape[1] and t:
        first_before = to_universe(sh_before, map_before)[:, 0] if sh_before.shape[1] else np.full(t, -1)
        first_after = d.after_uid[:, 0]
        rows = np.flatnonzero((first_after >= 0) & (first_after != first_before) & ~d.new_slots[:, 0])
        promoted = [(tenants[r], universe[first_after[r]]) for r in rows.tolist()]

    # Every worker registered before or after (removed ones end at 0, added ones start at 0).
    per_worker = {w: (int(d.count_before[i]), int(d.count_after[i])) for i, w in enumerate(universe)}
    return ShardPlan(
        tenants=t,
        placements_before=d.placements_before,
        placements_after=d.placements_after,
        moved_placements=d.moved_placements,
        tenants_changed=int(d.changed_rows.sum()),
        per_worker=per_worker,
        warmups=warmups,
        promoted=promoted,
        short_shard_tenants=int(np.count_nonzero(k_after > len(live_after))),
    )


# --- diffing two fleet states (shared with report.py) --------------------------------------

@dataclass(frozen=True)
class ShardDiff:
    """Per-tenant comparison of two ``fleet_shards`` results over one worker id space."""

    after_uid: np.ndarray       # (T, k_after) worker ids (universe) of the after shards, -1 padded
    new_slots: np.ndarray       # (T, k_after) bool: that after placement was not there before
    changed_rows: np.ndarray    # (T,) bool: the shard set differs
    moved_rows: np.ndarray      # (T,) int: placements of the row present before and gone after
    count_before: np.ndarray    # (U,) placements per worker before
    count_after: np.ndarray     # (U,) placements per worker after
    placements_before: int
    placements_after: int
    moved_placements: int


def diff_shards(before: np.ndarray, map_before: np.ndarray, after: np.ndarray, map_after: np.ndarray,
                universe: int) -> ShardDiff:
    """Diff two ``fleet_shards`` results whose columns index different member lists.

    ``map_before[i]`` / ``map_after[i]`` give the id (0..universe-1) of member i of each list,
    so both states are compared as sets of ids, as bitmasks of ceil(universe / 64) words.
    """
    uid_b = to_universe(before, map_before)
    uid_a = to_universe(after, map_after)
    mb = shard_masks(uid_b, universe)
    ma = shard_masks(uid_a, universe)
    gone = np.bitwise_count(mb & ~ma).sum(axis=1, dtype=np.int64)
    valid_a = uid_a >= 0
    if uid_a.size:
        safe = np.where(valid_a, uid_a, 0)
        word = mb[np.arange(len(uid_a))[:, None], safe >> 6]
        was_there = ((word >> (safe & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
        new_slots = valid_a & ~was_there
    else:
        new_slots = valid_a
    return ShardDiff(
        after_uid=uid_a,
        new_slots=new_slots,
        changed_rows=np.any(mb != ma, axis=1),
        moved_rows=gone,
        count_before=placement_counts(uid_b, universe),
        count_after=placement_counts(uid_a, universe),
        placements_before=int(np.count_nonzero(uid_b >= 0)),
        placements_after=int(np.count_nonzero(valid_a)),
        moved_placements=int(gone.sum()),
    )


def to_universe(shards: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Map member indices (-1 padded) through ``mapping``; padding stays -1."""
    if mapping.size == 0:
        return np.full(shards.shape, -1, dtype=np.int64)
    out = mapping[np.maximum(shards, 0)]
    out[shards < 0] = -1
    return out


def shard_masks(uid: np.ndarray, universe: int) -> np.ndarray:
    """(T, ceil(universe / 64)) uint64 bitmasks of each row's worker ids (-1 entries ignored)."""
    rows = uid.shape[0]
    words = max(1, -(-universe // 64))
    out = np.zeros((rows, words), dtype=np.uint64)
    r = np.arange(rows)
    for c in range(uid.shape[1]):
        col = uid[:, c]
        valid = col >= 0
        safe = np.where(valid, col, 0)
        bits = np.where(valid, np.left_shift(np.uint64(1), (safe & 63).astype(np.uint64)), np.uint64(0))
        out[r, safe >> 6] |= bits  # each row once per column: no repeated fancy indices
    return out


def placement_counts(uid: np.ndarray, universe: int) -> np.ndarray:
    """Placements per worker id: how many rows hold each id."""
    flat = uid[uid >= 0]
    return np.bincount(flat, minlength=universe).astype(np.int64)


# --- private helpers ------------------------------------------------------------------------

def _check_size(what: str, k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{what} must be an integer >= 1, got {k!r}")
    if not 1 <= k <= MAX_SHARD_SIZE:
        raise ValueError(f"{what} must be between 1 and {MAX_SHARD_SIZE}, got {k}")


def _apply_sizes(ks: np.ndarray, index: dict[str, int], pairs) -> None:
    for tenant, k in pairs:
        i = index.get(tenant)
        if i is not None:
            ks[i] = k


def _apply_workers(members: list[Member], draining: set[str],
                   change: FleetChange) -> tuple[list[Member], set[str]]:
    """The registered members and draining set after ``change``'s worker steps, validated."""
    after = list(members)
    present = {m.worker_id for m in after}
    drain = set(draining)
    for m in change.add:
        if not isinstance(m, Member):
            raise ValueError(f"add expects sharding.Member entries, got {m!r}")
        if m.worker_id in present:
            raise ValueError(f"cannot add worker {m.worker_id!r}: a worker with that id already exists")
        present.add(m.worker_id)
        after.append(m)
    named = Counter([*change.remove, *change.drain, *change.undrain])
    twice = sorted(w for w, n in named.items() if n > 1)
    if twice:
        raise ValueError(f"worker {twice[0]!r} is named more than once among --remove-worker, --drain and "
                         f"--undrain: give each worker one change")
    for w in change.remove:
        if w not in present:
            raise ValueError(f"cannot remove worker {w!r}: no such worker")
        present.discard(w)
        drain.discard(w)
        after = [m for m in after if m.worker_id != w]
    for w in change.drain:
        if w not in present:
            raise ValueError(f"cannot drain worker {w!r}: no such worker")
        if w in drain:
            raise ValueError(f"cannot drain worker {w!r}: it is already draining")
        drain.add(w)
    for w in change.undrain:
        if w not in present:
            raise ValueError(f"cannot undrain worker {w!r}: no such worker")
        if w not in drain:
            raise ValueError(f"cannot undrain worker {w!r}: it is not draining")
        drain.discard(w)
    return after, drain


def _resize_only(tenants: list[str], live: list[Member], before: np.ndarray,
                 k_before: np.ndarray, k_after: np.ndarray) -> np.ndarray:
    """After-shards when only sizes change: recompute just the resized rows.

    Same live set, so an unresized row is unchanged; only the output width (max k) may differ.
    """
    width = min(int(k_after.max()), len(live)) if len(tenants) else 0  # as fleet_shards: no wider than the fleet
    out = np.full((len(tenants), width), -1, dtype=np.int32)
    keep = min(width, before.shape[1])
    out[:, :keep] = before[:, :keep]
    rows = np.flatnonzero(k_before != k_after)
    if rows.size:
        part = fleet_shards([tenants[i] for i in rows.tolist()], live, k_after[rows])
        out[rows] = -1
        out[rows, :part.shape[1]] = part
    return out
