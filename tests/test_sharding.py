"""Shuffle sharding: the invariants of sharding/, stated as tests.

The reference ``spec_shard`` below is a literal transcription of the algorithm in
ARCHITECTURE.md (rank by score, then zone rounds walked one pick at a time); the package's
faster formulations are checked against it.
"""
from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from unittest import mock

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharding.member
from sharding import Member, ShardCache, fleet_shards, shard_for, tenant_hash, worker_hash
from sharding.hashing import MASK64, mix64, mix64_array, scores

settings.register_profile("sharding", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sharding")


# --- the spec, transcribed ---------------------------------------------------------------

def spec_shard(tenant: str, members: Sequence[Member], k: int,
               whash: Callable[[str], int] = worker_hash) -> tuple[str, ...]:
    th = tenant_hash(tenant)
    ranked = sorted(members, key=lambda m: (-mix64(th ^ whash(m.worker_id)), m.worker_id))
    out: list[Member] = []
    used: set[str] = set()
    remaining = list(ranked)
    while remaining:
        pick = next(m for m in remaining if m.zone not in used)
        out.append(pick)
        remaining.remove(pick)
        used.add(pick.zone)
        if {m.zone for m in remaining} <= used:  # every zone with workers left used: new round
            used = set()
    return tuple(m.worker_id for m in out[:k])


# --- strategies ----------------------------------------------------------------------------

worker_ids = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=6)
tenants = st.text(max_size=12)


@st.composite
def member_sets(draw, min_size: int = 0, max_size: int = 12, zones: bool = True) -> list[Member]:
    ids = draw(st.lists(worker_ids, min_size=min_size, max_size=max_size, unique=True))
    if not zones:
        return [Member(w) for w in ids]
    zone_names = draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=4, unique=True))
    return [Member(w, draw(st.sampled_from(zone_names))) for w in ids]


def zone_counts(ids: Sequence[str], members: Sequence[Member]) -> Counter:
    zone = {m.worker_id: m.zone for m in members}
    return Counter(zone[w] for w in ids)


def fleet_rows_as_ids(rows: np.ndarray, members: Sequence[Member]) -> list[tuple[str, ...]]:
    return [tuple(members[j].worker_id for j in row if j >= 0) for row in rows]


# --- hashing ------------------------------------------------------------------------------

@given(st.integers(min_value=0, max_value=MASK64))
def test_mix64_int_and_numpy_agree(x):
    assert int(mix64_array(np.array([x], dtype=np.uint64))[0]) == mix64(x)


@given(st.integers(min_value=0, max_value=MASK64))
def test_mix64_is_a_bijection(x):
    # Why it matters: scores tie exactly when worker hashes tie (fleet.py relies on it).
    def unxorshift(y: int) -> int:
        return y ^ (y >> 33)  # shift >= 32: xor-shift is its own inverse

    y = mix64(x)
    y = unxorshift(y)
    y = (y * pow(0xC4CEB9FE1A85EC53, -1, 1 << 64)) & MASK64
    y = unxorshift(y)
    y = (y * pow(0xFF51AFD7ED558CCD, -1, 1 << 64)) & MASK64
    assert unxorshift(y) == x


def test_hashes_are_xxh3_and_scores_are_mix64_of_xor():
    assert tenant_hash("acme") == xxhash.xxh3_64_intdigest(b"acme")
    assert worker_hash("w-1") == xxhash.xxh3_64_intdigest(b"w-1")
    th = tenant_hash("acme")
    whs = [worker_hash(f"w-{i}") for i in range(20)]
    assert scores(th, whs) == [mix64(th ^ wh) for wh in whs]
    assert mix64(0) == 0 and mix64(1 << 64) == 0  # masks to 64 bits


# --- one tenant ---------------------------------------------------------------------------

@given(tenants, member_sets(), st.integers(min_value=1, max_value=15))
def test_shard_for_matches_spec(tenant, members, k):
    assert shard_for(tenant, members, k) == spec_shard(tenant, members, k)


@given(tenants, member_sets(), st.integers(min_value=1, max_value=15), st.randoms(use_true_random=False))
def test_deterministic_whatever_the_member_order(tenant, members, k, rnd):
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert shard_for(tenant, members, k) == shard_for(tenant, shuffled, k) == shard_for(tenant, members, k)


@given(tenants, member_sets(min_size=1), st.integers(min_value=1, max_value=12))
def test_k_distinct_members_from_input(tenant, members, k):
    shard = shard_for(tenant, members, k)
    assert len(shard) == min(k, len(members))
    assert len(set(shard)) == len(shard)
    assert set(shard) <= {m.worker_id for m in members}


@given(tenants, member_sets(), st.integers(min_value=0, max_value=5))
def test_k_beyond_live_workers_is_all_of_them(tenant, members, extra):
    shard = shard_for(tenant, members, len(members) + 1 + extra)
    assert sorted(shard) == sorted(m.worker_id for m in members)


@given(tenants, member_sets(min_size=1))
def test_shards_are_prefixes_of_one_order(tenant, members):
    full = shard_for(tenant, members, len(members))
    for k in range(1, len(members) + 2):
        assert shard_for(tenant, members, k) == full[:k]


@given(tenants, member_sets(min_size=1), worker_ids, st.sampled_from("abcdef"),
       st.integers(min_value=1, max_value=6))
def test_adding_a_worker_moves_at_most_one_placement(tenant, members, new_id, zone, k):
    if new_id in {m.worker_id for m in members}:
        return
    before = shard_for(tenant, members, k)
    after = shard_for(tenant, [*members, Member(new_id, zone)], k)
    if len(members) < k:  # room in the shard: the newcomer just joins
        assert set(after) == set(before) | {new_id}
    elif set(after) != set(before):
        left = set(before) - set(after)
        assert set(after) - set(before) == {new_id}  # only the newcomer comes in
        assert len(left) == 1                        # and exactly one member makes room
        if len({m.zone for m in members} | {zone}) == 1:
            assert left == {before[-1]}  # without zones, always the weakest


@given(tenants, member_sets(min_size=1), st.integers(min_value=1, max_value=6), st.data())
def test_removing_a_worker_moves_only_its_placements(tenant, members, k, data):
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    before = shard_for(tenant, members, k)
    after = shard_for(tenant, rest, k)
    if gone.worker_id not in before:
        assert after == before
    else:
        assert set(before) - set(after) == {gone.worker_id}
        came_in = set(after) - set(before)
        assert len(came_in) == (1 if len(rest) >= k else 0)


@given(tenants, member_sets(min_size=1))
def test_zone_spread(tenant, members):
    """No zone gets another member while a zone with workers left has fewer."""
    order = shard_for(tenant, members, len(members))
    total = Counter(m.zone for m in members)
    for p in range(1, len(order) + 1):
        have = zone_counts(order[:p], members)
        with_left = [z for z in total if have[z] < total[z]]
        for z in total:
            for y in with_left:
                assert have[z] <= have[y] + 1, (order[:p], z, y)


@given(tenants, member_sets(min_size=1, zones=False), st.sampled_from(["default", "eu-1"]),
       st.integers(min_value=1, max_value=8))
def test_single_zone_is_the_plain_score_order(tenant, members, zone, k):
    th = tenant_hash(tenant)
    plain = sorted((m.worker_id for m in members), key=lambda w: (-mix64(th ^ worker_hash(w)), w))
    zoned = [Member(m.worker_id, zone) for m in members]
    assert shard_for(tenant, zoned, k) == tuple(plain[:k])


def test_zone_aware_example():
    members = [Member(f"{z}{i}", z) for z in "ab" for i in range(4)]
    for t in range(50):
        shard = shard_for(f"t{t}", members, 2)
        assert {w[0] for w in shard} == {"a", "b"}  # one per zone before any zone repeats


def test_invalid_inputs_say_what_is_wrong():
    members = [Member("w1"), Member("w2")]
    with pytest.raises(ValueError, match="k must be >= 1"):
        shard_for("t", members, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        shard_for("t", members, -3)
    with pytest.raises(ValueError, match="duplicate worker_id 'w1'"):
        shard_for("t", [Member("w1", "a"), Member("w1", "b")], 1)
    with pytest.raises(TypeError, match=r"members\[1\] is str"):
        shard_for("t", [Member("w1"), "w2"], 1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="worker_id"):
        Member("")
    with pytest.raises(ValueError, match="k must be >= 1"):
        fleet_shards(["t"], members, 0)
    with pytest.raises(ValueError, match=r"k\[1\] = 0"):
        fleet_shards(["t", "u"], members, np.array([1, 0]))
    with pytest.raises(ValueError, match="shape"):
        fleet_shards(["t", "u"], members, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ShardCache(members).get("t", 0)


def test_no_members_means_empty_shards():
    assert shard_for("t", [], 3) == ()
    assert ShardCache().get("t", 2) == ()
    assert (fleet_shards(["t", "u"], [], 2) == -1).all()


# --- the whole fleet ----------------------------------------------------------------------

@settings(max_examples=60)
@given(st.lists(tenants, max_size=30), member_sets(max_size=10), st.data())
def test_fleet_shards_equals_shard_for(tenant_list, members, data):
    t = len(tenant_list)
    ks = np.array(data.draw(st.lists(st.integers(1, 12), min_size=t, max_size=t)), dtype=np.int64)
    rows = fleet_shards(tenant_list, members, ks)
    assert rows.dtype == np.int32 and rows.shape == (t, min(int(ks.max()), len(members)) if t else 0)
    assert fleet_rows_as_ids(rows, members) == [shard_for(x, members, int(k)) for x, k in zip(tenant_list, ks)]
    k = data.draw(st.integers(1, 12))
    rows = fleet_shards(tenant_list, members, k)
    assert rows.shape == (t, min(k, len(members)))
    assert fleet_rows_as_ids(rows, members) == [shard_for(x, members, k) for x in tenant_list]


def test_one_huge_shard_size_costs_no_tenants_x_k_array():
    """No row can hold more members than there are: 100k tenants, one of them at k = 10**9."""
    tenants = [f"t{i}" for i in range(100_000)]
    ks = np.full(len(tenants), 2, dtype=np.int64)
    ks[0] = 10**9
    rows = fleet_shards(tenants, [Member(f"w{i}") for i in range(3)], ks)
    assert rows.shape == (100_000, 3) and (rows[0] >= 0).all() and (rows[1:, 2] == -1).all()


@settings(max_examples=60)
@given(st.lists(tenants, max_size=20), member_sets(max_size=10), st.integers(1, 12))
def test_fleet_and_shard_for_agree_on_ties(tenant_list, members, k):
    """Force worker-hash collisions (hence score ties): both paths must break them by id."""
    def colliding(w: str) -> int:
        return xxhash.xxh3_64_intdigest(w.encode()) & 3

    with mock.patch.object(sharding.member, "worker_hash", colliding):
        rows = fleet_shards(tenant_list, members, k)
        expected = [shard_for(x, members, k) for x in tenant_list]
    assert fleet_rows_as_ids(rows, members) == expected
    assert expected == [spec_shard(x, members, k, colliding) for x in tenant_list]


def test_fleet_shards_large_zoned_sample():
    members = [Member(f"worker-{i:02d}", "abc"[i % 3] if i < 40 else "d") for i in range(64)]
    random.Random(7).shuffle(members)
    tenant_list = [f"tenant-{i}" for i in range(40_000)]  # > one internal chunk
    ks = np.random.default_rng(1).integers(1, 70, size=len(tenant_list))
    rows = fleet_shards(tenant_list, members, ks)
    for i in range(0, len(tenant_list), 211):
        got = tuple(members[j].worker_id for j in rows[i] if j >= 0)
        assert got == shard_for(tenant_list[i], members, int(ks[i]))


# --- the numbers ARCHITECTURE.md promises ---------------------------------------------------

def test_isolation_balance_and_movement_at_16_workers_k2():
    n, k, t = 16, 2, 100_000
    members = [Member(f"worker-{i:02d}") for i in range(n)]
    tenant_list = [f"tenant-{i}" for i in range(t)]
    rows = fleet_shards(tenant_list, members, k)

    # Identical-shard fraction: mean over tenants of the share of other tenants on the very
    # same shard; ideal 1/C(16,2) = 1/120.
    pair = np.sort(rows, axis=1)
    counts = np.bincount(pair[:, 0] * n + pair[:, 1])
    identical = float((counts * (counts - 1)).sum()) / (t * (t - 1))
    assert abs(identical * 120 - 1) < 0.10, identical

    per_worker = np.bincount(rows.ravel(), minlength=n)
    assert per_worker.max() / per_worker.mean() <= 1.10, per_worker

    # A 17th worker enters the top k of ~k/(N+1) of tenants, moving one placement in each:
    # k/(N+1) of tenants change shard, i.e. 1/(N+1) of all T*k placements move (the
    # newcomer's fair share), and every moved placement moves onto the newcomer.
    grown = fleet_shards(tenant_list, [*members, Member("worker-16")], k)
    moved = [set(a) ^ set(b) for a, b in zip(rows.tolist(), grown.tolist())]
    assert all(not m or (len(m) == 2 and 16 in m) for m in moved)
    tenants_changed = sum(1 for m in moved if m) / t
    placements_moved = sum(len(m) // 2 for m in moved) / (t * k)
    assert abs(tenants_changed / (k / (n + 1)) - 1) < 0.10, tenants_changed
    assert abs(placements_moved / (1 / (n + 1)) - 1) < 0.10, placements_moved


# --- ShardCache -----------------------------------------------------------------------------

@given(st.lists(tenants, max_size=20), member_sets(), st.integers(1, 6))
def test_cache_equals_shard_for(tenant_list, members, k):
    cache = ShardCache(members)
    for _ in range(2):  # miss, then hit
        for x in tenant_list:
            assert cache.get(x, k) == shard_for(x, members, k)


def test_cache_follows_member_changes_and_invalidation():
    members = [Member(f"w{i}", "ab"[i % 2]) for i in range(8)]
    cache = ShardCache(members)
    first = cache.get("acme", 3)
    assert cache.get("acme", 3) is first  # a hit returns the memoised tuple
    assert cache.get("acme", 5) == shard_for("acme", members, 5)  # another k recomputes
    assert cache.get("acme", 3) == first

    smaller = [m for m in members if m.worker_id not in first]
    cache.set_members(smaller)
    assert cache.members == tuple(smaller)
    assert cache.get("acme", 3) == shard_for("acme", smaller, 3)
    assert not set(cache.get("acme", 3)) & set(first)

    cache.get("other", 2)
    assert len(cache) == 2
    cache.invalidate("acme")
    assert len(cache) == 1
    cache.invalidate()
    assert len(cache) == 0
    assert cache.members == tuple(smaller)  # invalidating all keeps the member set

    with pytest.raises(ValueError, match="duplicate"):
        cache.set_members([Member("x"), Member("x")])
    assert cache.members == tuple(smaller)  # a rejected member set changes nothing


def test_cache_is_bounded():
    cache = ShardCache([Member(f"w{i}") for i in range(4)], max_entries=100)
    for i in range(1_000):
        cache.get(f"t{i}", 2)
        assert len(cache) <= 100


def test_cache_hit_is_cheap():
    cache = ShardCache([Member(f"worker-{i:02d}", "abc"[i % 3]) for i in range(64)])
    names = [f"tenant-{i}" for i in range(1_000)]
    for x in names:
        cache.get(x, 3)
    get, clock = cache.get, time.perf_counter_ns
    samples = []
    for x in names * 5:
        t0 = clock()
        get(x, 3)
        samples.append(clock() - t0)
    assert statistics.median(samples) <= 5_000  # budget: <= 5 µs median (typically well under 1 µs)
