"""Rendezvous (highest-random-weight) shuffle sharding for one tenant.

A tenant's shard is its k best-scoring workers, ``score = mix64(tenant_hash ^ worker_hash)``,
ties broken by worker id ascending. Nothing is stored: every router computes the same shard
from the same live member set.

Invariants (each stated as a property test in tests/test_sharding.py):

* Determinism: the shard depends on (tenant, set of members, k) only, not on member order.
* Prefix: ``shard_for(t, m, k)`` is the first k entries of ``shard_for(t, m, len(m))``, so a
  bigger shard only appends members and the order is the router's retry order.
* Minimal movement (single zone): adding a worker changes a shard by at most one member, and
  then the newcomer replaced the old last member; removing a worker changes only the shards
  that held it, each by that worker replaced by one other. This is the HRW property: no
  worker's score changes when another joins or leaves.
* Zone spread: walking the order, a zone never gets its (r+1)-th member while another zone
  that still has unplaced workers has fewer than r: member counts per zone differ by at most
  one while zones have workers left. With one zone the order is the plain score order.
  (Zone awareness trades a little movement for spread: adding a worker can also reshuffle
  which zone fills the last slot, still one member in and one out in practice, but the member
  that comes in is not always the newcomer.)
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

from sharding.hashing import scores, tenant_hash
from sharding.member import Member, PreparedMembers, prepare


def shard_for(tenant: str, members: Sequence[Member], k: int) -> tuple[str, ...]:
    """The ordered shard of ``k`` worker ids for ``tenant``; all members if k exceeds them.

    Prepares (validates, hashes, id-orders) the member set on every call; the router's hot
    path uses ``ShardCache``, which prepares once per member set.
    """
    return ordered_shard(tenant_hash(tenant), prepare(members), k)


def ordered_shard(th: int, pm: PreparedMembers, k: int) -> tuple[str, ...]:
    """``shard_for`` given the tenant's hash and a prepared member set."""
    if k <= 0:
        raise ValueError(f"shard size k must be >= 1, got {k}")
    n = pm.n
    sc = scores(th, pm.hashes)
    key = sc.__getitem__
    ids = pm.ids
    # Candidates are in id order and both sorts below are stable with reverse=True, so equal
    # scores keep id order: the tie-break by worker id ascending.
    if len(pm.zone_names) <= 1:
        if k < n:
            top = heapq.nlargest(k, range(n), key=key)  # == sorted(..., reverse=True)[:k]
        else:
            top = sorted(range(n), key=key, reverse=True)
        return tuple([ids[i] for i in top])
    ranked = sorted(range(n), key=key, reverse=True)
    return tuple([ids[i] for i in zone_order(ranked, pm.zone_codes)[:k]])


def zone_order(ranked: list[int], zone_codes: Sequence[int]) -> list[int]:
    """Reorder a score-ranked list into zone rounds.

    The spec: walk the ranked list, repeatedly taking the best remaining worker whose zone is
    not yet used in the current round; start a new round once every zone with workers left
    has been used. Round r therefore holds exactly the r-th best worker (0-based) of each zone
    that has more than r workers, in score order. So the result is the ranked list stably
    sorted by "rank within own zone" (a worker's round), which is what this computes, in
    O(n log n) instead of the walk's O(n * zones).

    Keeps the zone-spread invariant: every zone with workers left gets its r-th member before
    any zone gets its (r+1)-th.
    """
    seen = [0] * (max(zone_codes, default=-1) + 1)
    round_of = {}
    for i in ranked:
        z = zone_codes[i]
        round_of[i] = seen[z]
        seen[z] += 1
    return sorted(ranked, key=round_of.__getitem__)
