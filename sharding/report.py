"""How well a fleet's shuffle sharding isolates tenants, measured and against theory. No I/O.

``isolation_report(tenants, members, k)`` computes every shard once with ``fleet_shards`` and
reports, as a JSON-serialisable dict (plain ints, floats, lists, dicts; ``None`` where a value
is undefined, e.g. pair statistics with fewer than two tenants):

* ``identical_shard_fraction``: mean over tenants of the fraction of the *other* tenants whose
  shard is the same set of workers (= identical unordered pairs / all pairs). An incident
  that takes one whole shard down reaches that fraction of the other tenants.
* ``overlap_distribution[j]``: fraction of unordered tenant pairs whose shards share exactly j
  workers, j = 0..max shard size. Exact, without T^2 work (``overlap_method``):
  for each subset size s, n_S = number of shards containing the s-subset S of workers; then
  sum_S C(n_S, 2) = sum over pairs of C(|A n B|, s) =: M_s, and since
  M_s = sum_j C(j, s) c_j, the pair counts c_j follow by binomial inversion
  c_j = sum_{s>=j} (-1)^(s-j) C(s, j) M_s (exact integers). This holds for mixed shard sizes
  too. Enumerating subsets costs sum over tenants of 2^k_i keys; where that exceeds
  ``_EXACT_KEY_BUDGET`` (large k) the report compares all pairs directly if there are at most
  ``_ALL_PAIRS_MAX`` of them, else samples ``_SAMPLED_PAIRS`` random pairs (seeded).
* ``tenants_per_worker`` and its ``max_over_mean`` (placements per worker; mean over all
  live workers).
* ``moved_fraction_add_one``: fraction of TENANTS whose shard set changes when one fresh worker
  (id ``__probe__``, in the most populated zone) joins (computed as: shards with the probe, then
  only the rows holding it recomputed without, by the rendezvous removal invariant); ``moved_placement_fraction_add_one``:
  fraction of PLACEMENTS (tenant x worker slots) that move. Theory k/(N+1) and 1/(N+1).
* ``short_shard_tenants``: tenants whose k exceeds the N live workers (shard = all workers).

Theory (``*_theory`` fields) models each shard as a uniformly random subset of e_i = min(k_i, N)
of the N live workers, independent across tenants. That is exact for one zone (rendezvous
scores are independent per worker). With several zones shards are zone-balanced, not uniform,
so measured values deviate (fewer distinct shards when k is a multiple of the zone count).
For per-tenant k:
  identical theory = sum_e m_e (m_e - 1) / (T (T-1) C(N, e))  (only equal-size shards can be
  identical; m_e = tenants of effective size e), which for one k is 1/C(N, k);
  overlap theory = pair-weighted mix of hypergeometrics C(a,j) C(N-a,b-j) / C(N,b) over the
  size pairs (a, b) of all unordered tenant pairs;
  moved theory = mean_i min(k_i, N+1) / (N+1) (tenants) and
  sum_{k_i<=N} k_i/(N+1) / sum_i min(k_i, N) (placements).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from sharding.fleet import fleet_shards
from sharding.member import Member
from sharding.plan import diff_shards, placement_counts, shard_masks

PROBE_ID = "__probe__"
_EXACT_KEY_BUDGET = 12_000_000   # subset keys enumerated by the exact overlap method
_ALL_PAIRS_MAX = 2_000_000       # otherwise compare every pair directly up to this many pairs
_SAMPLED_PAIRS = 1_000_000       # otherwise sample this many pairs
_BINCOUNT_MAX = 1 << 22          # subset key spaces up to this size are counted with bincount


def isolation_report(tenants: Sequence[str], members: Sequence[Member], k: int | np.ndarray) -> dict:
    """Isolation metrics of shuffle sharding ``tenants`` over live ``members`` with size ``k``.

    ``k`` is one shard size or an integer array with one per tenant (as for ``fleet_shards``).
    See the module docstring for every field and the theory it is compared with.
    """
    tenants = list(tenants)
    members = list(members)
    t, n = len(tenants), len(members)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (t,))
    probe = _probe_member(members)
    after = fleet_shards(tenants, members + [probe], k)  # validates k
    shards = _without_probe(tenants, members, ks, after)
    eff = np.minimum(ks, n)  # effective shard sizes
    ident = np.arange(n, dtype=np.int64)
    uid = np.where(shards >= 0, shards, -1).astype(np.int64)
    masks = shard_masks(uid, n)
    pairs = t * (t - 1) // 2

    out: dict = {
        "tenants": t,
        "workers": n,
        "zones": len({m.zone for m in members}),
        "shard_size": _shard_size_summary(k, ks),
        "pairs": pairs,
    }
    distinct, counts = _distinct_rows(masks)
    out["distinct_shards"] = distinct

    # Identical shards.
    if pairs:
        out["identical_shard_fraction"] = float((counts * (counts - 1)).sum() / (t * (t - 1)))
        sizes = Counter(eff.tolist())
        out["identical_shard_fraction_theory"] = float(sum(
            m * (m - 1) / math.comb(n, e) for e, m in sizes.items()) / (t * (t - 1)))
    else:
        out["identical_shard_fraction"] = None
        out["identical_shard_fraction_theory"] = None

    # Overlap distribution.
    if pairs:
        dist, method = _overlap_distribution(uid, eff, masks, n)
        out["overlap_distribution"] = dist
        out["overlap_distribution_theory"] = _overlap_theory(eff, n)
    else:
        out["overlap_distribution"], out["overlap_distribution_theory"], method = None, None, "none (fewer than 2 tenants)"
    out["overlap_method"] = method

    # Load per worker.
    per = placement_counts(uid, n)
    placements = int(per.sum())
    out["placements"] = placements
    out["tenants_per_worker"] = {m.worker_id: int(c) for m, c in zip(members, per.tolist())}
    out["tenants_per_worker_max_over_mean"] = float(per.max() / (placements / n)) if placements else None

    # One worker joins.
    d = diff_shards(shards, ident, after, np.arange(n + 1, dtype=np.int64), n + 1)
    out["probe_worker"] = {"worker_id": probe.worker_id, "zone": probe.zone}
    out["moved_fraction_add_one"] = float(d.changed_rows.mean()) if t else None
    out["moved_fraction_add_one_theory"] = float(np.minimum(ks, n + 1).mean() / (n + 1)) if t else None
    out["moved_placement_fraction_add_one"] = d.moved_placements / placements if placements else None
    out["moved_placement_fraction_add_one_theory"] = (
        float(ks[ks <= n].sum() / (n + 1) / placements) if placements else None)

    short = int(np.count_nonzero(ks > n))
    out["short_shard_tenants"] = short
    out["short_shards"] = short > 0
    out["theory_assumes"] = ("each shard a uniformly random subset of min(k, N) live workers; exact for one zone, "
                             "approximate with several (zone-balanced shards)")
    return out


def simulated_fleet(workers: int, tenants: int, zones: int = 1) -> tuple[list[str], list[Member]]:
    """Synthetic fleet: tenants "tenant-000001".., workers "worker-01".., zones "zone-a", "zone-b"..
    assigned to workers round-robin (worker i in zone i mod zones)."""
    if workers < 0 or tenants < 0:
        raise ValueError(f"workers and tenants must be >= 0, got workers={workers}, tenants={tenants}")
    if zones < 1:
        raise ValueError(f"zones must be >= 1, got {zones}")
    tw = max(6, len(str(tenants)))
    ww = max(2, len(str(workers)))
    names = [f"zone-{_letters(z)}" for z in range(zones)]
    return ([f"tenant-{i:0{tw}d}" for i in range(1, tenants + 1)],
            [Member(f"worker-{i:0{ww}d}", names[(i - 1) % zones]) for i in range(1, workers + 1)])


# --- overlap -------------------------------------------------------------------------------

def _overlap_distribution(uid: np.ndarray, eff: np.ndarray, masks: np.ndarray, n: int) -> tuple[list[float], str]:
    t = len(uid)
    pairs = t * (t - 1) // 2
    kmax = int(eff.max())
    keys_needed = int(((1 << eff.astype(np.int64)) - 1).sum()) if kmax < 62 else None
    if keys_needed is not None and keys_needed <= _EXACT_KEY_BUDGET and n ** kmax < (1 << 62):
        counts = _overlap_counts_exact(uid, eff, n)
        return [c / pairs for c in counts], "exact (subset counting)"
    if pairs <= _ALL_PAIRS_MAX:
        i, j = np.triu_indices(t, 1)
        inter = np.bitwise_count(masks[i] & masks[j]).sum(axis=1)
        counts = np.bincount(inter, minlength=kmax + 1)
        return (counts / pairs).tolist(), "exact (all pairs)"
    rng = np.random.default_rng(0)
    i = rng.integers(0, t, _SAMPLED_PAIRS)
    j = rng.integers(0, t - 1, _SAMPLED_PAIRS)
    j += j >= i  # uniform over j != i
    inter = np.bitwise_count(masks[i] & masks[j]).sum(axis=1)
    counts = np.bincount(inter, minlength=kmax + 1)
    return (counts / _SAMPLED_PAIRS).tolist(), f"sampled ({_SAMPLED_PAIRS} random pairs)"


def _overlap_counts_exact(uid: np.ndarray, eff: np.ndarray, n: int) -> list[int]:
    """c_j = number of unordered pairs whose shards share exactly j workers (module docstring)."""
    t = len(uid)
    kmax = int(eff.max())
    # Each row's workers ascending, padding last, so column subsets are canonical s-subsets.
    rows = np.sort(np.where(uid >= 0, uid, n), axis=1)[:, :kmax]
    groups = [(m, rows[eff == m]) for m in range(1, kmax + 1) if np.any(eff == m)]
    m_s = [t * (t - 1) // 2]  # M_0 = all pairs
    for s in range(1, kmax + 1):
        weights = n ** np.arange(s, dtype=np.int64)
        keys = [g[:, list(c)] @ weights for m, g in groups if m >= s for c in itertools.combinations(range(m), s)]
        keys = np.concatenate(keys)
        if n ** s <= _BINCOUNT_MAX:
            cnt = np.bincount(keys, minlength=1)
            cnt = cnt[cnt > 1]
        else:
            keys.sort()
            edges = np.flatnonzero(np.diff(keys)) + 1
            cnt = np.diff(np.concatenate(([0], edges, [len(keys)])))
        m_s.append(int((cnt * (cnt - 1) // 2).sum()))
    return [sum((-1) ** (s - j) * math.comb(s, j) * m_s[s] for s in range(j, kmax + 1)) for j in range(kmax + 1)]


def _overlap_theory(eff: np.ndarray, n: int) -> list[float]:
    sizes = sorted(Counter(eff.tolist()).items())
    kmax = max(e for e, _ in sizes)
    total = 0
    acc = [0.0] * (kmax + 1)
    for x, (a, ma) in enumerate(sizes):
        for b, mb in sizes[x:]:
            w = ma * (ma - 1) // 2 if a == b else ma * mb
            if not w:
                continue
            total += w
            denom = math.comb(n, b)
            for j in range(min(a, b) + 1):
                acc[j] += w * math.comb(a, j) * math.comb(n - a, b - j) / denom
    return [v / total for v in acc]


def _without_probe(tenants: list[str], members: list[Member], ks: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``fleet_shards(tenants, members, ks)`` given ``after`` = the same with the probe appended.

    Rendezvous invariant (sharding.rendezvous, tested in tests/test_sharding.py): removing a
    worker changes only the shards that held it. So only rows holding the probe (about
    k/(N+1) of them) are recomputed; the others are ``after`` as is. Halves the report's cost.
    """
    n = len(members)
    before = after.copy()
    rows = np.flatnonzero(np.any(after == n, axis=1))
    if rows.size:
        part = fleet_shards([tenants[i] for i in rows.tolist()], members, ks[rows])
        before[rows] = -1
        before[rows, :part.shape[1]] = part
    return before


# --- small helpers -------------------------------------------------------------------------

def _distinct_rows(masks: np.ndarray) -> tuple[int, np.ndarray]:
    if len(masks) == 0:
        return 0, np.zeros(0, dtype=np.int64)
    if masks.shape[1] == 1:
        _, counts = np.unique(masks[:, 0], return_counts=True)
    else:
        _, counts = np.unique(masks, axis=0, return_counts=True)
    return len(counts), counts.astype(np.int64)


def _shard_size_summary(k: int | np.ndarray, ks: np.ndarray) -> int | dict:
    if np.ndim(k) == 0:
        return int(k)
    if len(ks) == 0:
        return {"min": None, "max": None, "mean": None}
    return {"min": int(ks.min()), "max": int(ks.max()), "mean": float(ks.mean())}


def _probe_member(members: list[Member]) -> Member:
    """A fresh worker in the most populated zone (ties: first zone by name), or "default"."""
    zones = Counter(m.zone for m in members)
    zone = min(zones, key=lambda z: (-zones[z], z)) if zones else "default"
    taken = {m.worker_id for m in members}
    wid, i = PROBE_ID, 0
    while wid in taken:
        i += 1
        wid = f"{PROBE_ID}{i}"
    return Member(wid, zone)


def _letters(i: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa, ... (bijective base 26)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return s
