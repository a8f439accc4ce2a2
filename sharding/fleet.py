"""Every tenant's shard at once, vectorised: the input to plans and isolation reports.

Row i of ``fleet_shards(tenants, members, k)``, read left to right and mapped through
``members``, equals ``shard_for(tenants[i], members, k_i)`` exactly, zones and ties included.
It computes the same scores (``mix64(tenant_hash ^ worker_hash)`` on uint64 arrays) and the
same order, just without ranking more of each row than the first k need:

* Plain: the top k per row (argpartition, then a sort of those k).
* Zones: the zone order is round-major (round r = the r-th best worker of every zone that has
  more than r, in score order; see ``rendezvous.zone_order``). How many rounds the first k
  slots span depends only on the zone sizes, so it is the same R for every tenant: take each
  zone's top min(R, size) and order each round's candidates by score.

Ties: scores tie only where worker hashes tie (``mix64`` is a bijection), which is decided once
per member set. Without ties, unstable sorts are exact. With ties, the code falls back to
stable sorts over id-ordered columns, which break ties by worker id like ``shard_for``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sharding.hashing import mix64_array, tenant_hashes
from sharding.member import Member, PreparedMembers, prepare

# Tenants scored per block: bounds the T x N temporaries (16k x 64 x 8 B = 8 MiB each).
_CHUNK_ROWS = 1 << 14


def fleet_shards(tenants: Sequence[str], members: Sequence[Member], k: int | np.ndarray) -> np.ndarray:
    """Ordered shards of all ``tenants`` as int32 indices into ``members``.

    ``k`` is one shard size for all tenants or an integer array with one per tenant. The
    result has shape (len(tenants), min(max k, len(members))): no row can hold more members
    than there are, so one tenant's huge k costs no T x k array. A row holds
    min(k_i, len(members)) indices followed by -1 padding.
    """
    pm = prepare(members)
    t = len(tenants)
    ks, kmax = _shard_sizes(k, t)
    kk = min(kmax, pm.n)  # columns that can hold a member
    out = np.full((t, kk), -1, dtype=np.int32)
    if t == 0 or kk == 0:
        return out

    th = tenant_hashes(tenants, count=t)
    wh = np.array(pm.hashes, dtype=np.uint64)
    to_caller = np.array(pm.index, dtype=np.int32)  # id-order column -> index into `members`
    order_rows = _plain_rows if len(pm.zone_names) == 1 else _zone_rows_for(pm, kk)
    for start in range(0, t, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, t)
        s = mix64_array(th[start:stop, None] ^ wh[None, :])
        cols = order_rows(s, kk, pm.has_hash_ties)
        out[start:stop, :kk] = to_caller[cols]

    if ks is not None:
        out[np.arange(kk)[None, :] >= ks[:, None]] = -1
    return out


def _shard_sizes(k: int | np.ndarray, t: int) -> tuple[np.ndarray | None, int]:
    """Validate ``k``; return (per-tenant sizes or None for a scalar, widest size)."""
    arr = np.asarray(k)
    if arr.ndim == 0:
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"shard size k must be an integer, got {k!r}")
        if int(arr) <= 0:
            raise ValueError(f"shard size k must be >= 1, got {int(arr)}")
        return None, int(arr)
    if arr.shape != (t,):
        raise ValueError(f"per-tenant k must have shape ({t},), got {arr.shape}")
    if t and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"per-tenant k must be an integer array, got dtype {arr.dtype}")
    if t == 0:
        return arr.astype(np.int64), 0
    if arr.min() <= 0:
        bad = int(np.argmax(arr <= 0))
        raise ValueError(f"shard size k must be >= 1, got k[{bad}] = {int(arr[bad])}")
    return arr.astype(np.int64), int(arr.max())


def _top(s: np.ndarray, m: int, ties: bool) -> np.ndarray:
    """Column indices of each row's m best scores, best first, ties by column ascending.

    Columns must be in worker-id order for "column ascending" to mean "worker id ascending".
    """
    n = s.shape[1]
    if m == 1:
        # argmax returns the first maximum: the lowest column among ties. Exact either way.
        return np.argmax(s, axis=1)[:, None]
    desc = ~s  # ascending order of ~s is descending order of s
    if ties:
        return np.argsort(desc, axis=1, kind="stable")[:, :m]
    if m >= n:
        return np.argsort(desc, axis=1)
    idx = np.argpartition(desc, m - 1, axis=1)[:, :m]
    o = np.argsort(np.take_along_axis(desc, idx, axis=1), axis=1)
    return np.take_along_axis(idx, o, axis=1)


def _plain_rows(s: np.ndarray, kk: int, ties: bool) -> np.ndarray:
    return _top(s, kk, ties)


def _zone_rows_for(pm: PreparedMembers, kk: int):
    """Build the zone-aware row orderer for this member set and width ``kk``."""
    codes = np.array(pm.zone_codes)
    zone_cols = [np.flatnonzero(codes == z) for z in range(len(pm.zone_names))]  # id order
    sizes = [len(c) for c in zone_cols]
    rounds = 1
    while sum(min(sz, rounds) for sz in sizes) < kk:
        rounds += 1

    def order_rows(s: np.ndarray, kk: int, ties: bool) -> np.ndarray:
        tops = []
        for cols in zone_cols:
            m = min(len(cols), rounds)
            tops.append(cols[_top(s[:, cols], m, ties)])  # (rows, m) global columns
        blocks = []
        width = 0
        for r in range(rounds):
            cand = [top[:, r] for top in tops if top.shape[1] > r]
            block = np.stack(cand, axis=1)
            if block.shape[1] > 1:
                if ties:
                    block = np.sort(block, axis=1)  # id order, so the stable sort breaks ties by id
                sc = np.take_along_axis(s, block, axis=1)
                o = np.argsort(~sc, axis=1, kind="stable" if ties else "quicksort")
                block = np.take_along_axis(block, o, axis=1)
            blocks.append(block)
            width += block.shape[1]
            if width >= kk:
                break
        return np.concatenate(blocks, axis=1)[:, :kk]

    return order_rows
