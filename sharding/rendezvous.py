"""Rendezvous (highest-random-weight) shuffle sharding for one tenant.

A tenant's shard is its k best-scoring workers, ``score = mix64(tenant_hash ^ worker_hash)``,
ties broken by worker id ascending. Nothing is stored: every router computes the same shard
from the same live member set.

Invariants (each stated as a property test in tests/test_sharding.py):

* Determinism: the shard depends on (tenant, set of members, k) only, not on member order.
* Prefix: ``shard_for(t, m, k)`` is the first k entries of ``shard_for(t, m, len(m))``, so a
  bigger shard only appends members and the order is the router's retry order.
* Minimal movement: adding a worker changes a shard's member set by at most one: the
  newcomer in, one member out (without zones, always the last one). Removing a worker changes
  only the shards that held it, each by that worker replaced by at most one other. This is the
  HRW property (no worker's score changes when another joins or leaves) and it survives the
  zone rounds: a newcomer in zone Z only moves Z's later members one round back and can only
  overtake others within a round, so every other worker slips at most one place. With zones
  the *order* inside a shard can shift more than that; the set cannot.
* Zone spread: walking the order, a zone never gets its (r+2)-th member while another zone
  with workers left has only r: member counts per zone differ by at most one while zones have
  workers left. With one zone the order is the plain score order.
"""
from __future__ import annotations

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
    # (A full sort beats heapq.nlargest at fleet sizes: at 64 workers the scoring loop, not
    # the ordering, is most of a cold lookup.)
    ranked = sorted(range(n), key=key, reverse=True)
    if len(pm.zone_names) > 1:
        ranked = zone_order(ranked, pm.zone_codes)
    return tuple([ids[i] for i in ranked[:k]])


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
