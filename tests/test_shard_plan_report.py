"""Isolation reports and change plans (sharding/report.py, sharding/plan.py), stated as tests.

Statistical checks use the deterministic synthetic fleet (simulated_fleet), so they are exact
reruns, not flaky samples; tolerances are the ones the design promises (10 % of theory).
Exactness checks compare against brute force over all tenant pairs / shard_for per tenant.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharding.report as report_mod
from sharding import Member, shard_for
from sharding.plan import FleetChange, ShardPlan, plan_change
from sharding.report import isolation_report, simulated_fleet


def brute_pairs(tenants, members, k) -> tuple[list[float], float]:
    """(overlap distribution, identical fraction) over all pairs, from shard_for."""
    ks = np.broadcast_to(np.asarray(k), (len(tenants),))
    sets = [frozenset(shard_for(t, members, int(ki))) for t, ki in zip(tenants, ks)]
    width = max(len(s) for s in sets) + 1
    counts = [0] * width
    same = 0
    for a, b in itertools.combinations(sets, 2):
        counts[len(a & b)] += 1
        same += a == b
    pairs = math.comb(len(sets), 2)
    return [c / pairs for c in counts], same / pairs


def hypergeom(n: int, k: int) -> list[float]:
    return [math.comb(k, j) * math.comb(n - k, k - j) / math.comb(n, k) for j in range(k + 1)]


# --- isolation_report ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_16_2() -> dict:
    tenants, members = simulated_fleet(16, 100_000)
    return isolation_report(tenants, members, 2)


def test_report_n16_k2_matches_theory(report_16_2):
    r = report_16_2
    assert (r["tenants"], r["workers"], r["zones"], r["shard_size"]) == (100_000, 16, 1, 2)
    assert r["identical_shard_fraction_theory"] == pytest.approx(1 / 120)
    assert r["identical_shard_fraction"] == pytest.approx(1 / 120, rel=0.10)
    assert r["tenants_per_worker_max_over_mean"] <= 1.10
    assert r["moved_fraction_add_one_theory"] == pytest.approx(2 / 17)
    assert r["moved_fraction_add_one"] == pytest.approx(2 / 17, rel=0.10)
    assert r["moved_placement_fraction_add_one_theory"] == pytest.approx(1 / 17)
    assert r["moved_placement_fraction_add_one"] == pytest.approx(1 / 17, rel=0.10)
    dist = r["overlap_distribution"]
    assert len(dist) == 3 and sum(dist) == pytest.approx(1.0)
    assert r["overlap_distribution_theory"] == pytest.approx(hypergeom(16, 2))
    assert dist == pytest.approx(hypergeom(16, 2), abs=0.01)
    assert r["overlap_method"].startswith("exact")
    # Pairs sharing both workers are exactly the identical pairs.
    assert dist[2] == pytest.approx(r["identical_shard_fraction"])
    assert r["short_shard_tenants"] == 0 and r["short_shards"] is False


def test_report_is_json_and_counts_add_up(report_16_2):
    r = report_16_2
    assert json.loads(json.dumps(r)) == r
    assert sum(r["tenants_per_worker"].values()) == r["placements"] == 200_000
    assert len(r["tenants_per_worker"]) == 16
    per = list(r["tenants_per_worker"].values())
    assert r["tenants_per_worker_max_over_mean"] == pytest.approx(max(per) / (sum(per) / len(per)))


@pytest.mark.parametrize("zones, k", [(1, 3), (3, 3), (3, np.array([1, 2, 3, 4, 5, 9] * 50))])
def test_overlap_and_identical_exact_against_brute_force(zones, k):
    tenants, members = simulated_fleet(8, 300, zones)
    r = isolation_report(tenants, members, k)
    dist, same = brute_pairs(tenants, members, k)
    assert r["overlap_method"] == "exact (subset counting)"
    assert r["overlap_distribution"] == pytest.approx(dist, abs=1e-12)
    assert r["identical_shard_fraction"] == pytest.approx(same, abs=1e-12)


def test_overlap_fallbacks(monkeypatch):
    tenants, members = simulated_fleet(8, 300)
    dist, _ = brute_pairs(tenants, members, 3)
    monkeypatch.setattr(report_mod, "_EXACT_KEY_BUDGET", 0)
    r = isolation_report(tenants, members, 3)
    assert r["overlap_method"] == "exact (all pairs)"
    assert r["overlap_distribution"] == pytest.approx(dist, abs=1e-12)
    monkeypatch.setattr(report_mod, "_ALL_PAIRS_MAX", 0)
    r = isolation_report(tenants, members, 3)
    assert r["overlap_method"].startswith("sampled")
    assert r["overlap_distribution"] == pytest.approx(dist, abs=0.01)


def test_per_tenant_k_theory_and_summary():
    tenants, members = simulated_fleet(16, 20_000)
    ks = np.where(np.arange(20_000) % 2 == 0, 2, 3)
    r = isolation_report(tenants, members, ks)
    assert r["shard_size"] == {"min": 2, "max": 3, "mean": 2.5}
    # Only equal-size shards can be identical: half the pairs per size, roughly.
    theory = (0.5 / math.comb(16, 2) + 0.5 / math.comb(16, 3)) * (10_000 - 1) / (20_000 - 1)
    assert r["identical_shard_fraction_theory"] == pytest.approx(theory)
    assert r["identical_shard_fraction"] == pytest.approx(theory, rel=0.15)
    assert sum(r["overlap_distribution_theory"]) == pytest.approx(1.0)
    assert r["overlap_distribution"] == pytest.approx(r["overlap_distribution_theory"], abs=0.01)
    assert r["moved_fraction_add_one_theory"] == pytest.approx(2.5 / 17)
    assert r["moved_placement_fraction_add_one_theory"] == pytest.approx(1 / 17)


def test_short_shards_and_edge_cases():
    tenants, members = simulated_fleet(4, 100)
    ks = np.array([6] * 10 + [2] * 90)
    r = isolation_report(tenants, members, ks)
    assert r["short_shard_tenants"] == 10 and r["short_shards"] is True
    assert r["placements"] == 10 * 4 + 90 * 2
    r = isolation_report(tenants, members, 4)  # k == N: everyone shares all workers, not short
    assert r["short_shard_tenants"] == 0 and r["identical_shard_fraction"] == 1.0
    assert r["overlap_distribution"] == [0, 0, 0, 0, 1.0] and r["moved_fraction_add_one_theory"] == pytest.approx(0.8)

    one = isolation_report(tenants[:1], members, 2)
    assert one["identical_shard_fraction"] is None and one["overlap_distribution"] is None
    json.dumps(one)
    nobody = isolation_report(tenants, [], 2)
    assert nobody["short_shard_tenants"] == 100 and nobody["tenants_per_worker_max_over_mean"] is None
    json.dumps(nobody)
    assert isolation_report([], members, 2)["tenants"] == 0


def test_simulated_fleet_names():
    tenants, members = simulated_fleet(4, 3, zones=3)
    assert tenants == ["tenant-000001", "tenant-000002", "tenant-000003"]
    assert members == [Member("worker-01", "zone-a"), Member("worker-02", "zone-b"),
                       Member("worker-03", "zone-c"), Member("worker-04", "zone-a")]
    with pytest.raises(ValueError):
        simulated_fleet(4, 3, zones=0)


# --- plan_change ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet16():
    return simulated_fleet(16, 20_000)


def test_add_one_worker(fleet16):
    tenants, members = fleet16
    new = Member("worker-17", "zone-a")
    p = plan_change(tenants, members, (), {}, 3, FleetChange(add=(new,)))
    assert p.placements_before == p.placements_after == 60_000
    assert p.moved_placements / p.placements_before == pytest.approx(1 / 17, rel=0.10)
    assert p.tenants_changed == p.moved_placements == len(p.warmups)
    assert all(w == "worker-17" for _, w in p.warmups)
    assert p.per_worker["worker-17"] == (0, len(p.warmups))
    assert sum(b for b, _ in p.per_worker.values()) == sum(a for _, a in p.per_worker.values()) == 60_000


def test_remove_one_worker(fleet16):
    tenants, members = fleet16
    p = plan_change(tenants, members, (), {}, 3, FleetChange(remove=("worker-05",)))
    before, after = p.per_worker["worker-05"]
    assert after == 0 and p.moved_placements == before == p.tenants_changed == len(p.warmups)
    assert all(w != "worker-05" for _, w in p.warmups)
    on_removed = {t for t in tenants if "worker-05" in shard_for(t, members, 3)}
    assert {t for t, _ in p.warmups} == on_removed


def test_drain_is_remove_but_stays_listed(fleet16):
    tenants, members = fleet16
    removed = plan_change(tenants, members, (), {}, 3, FleetChange(remove=("worker-05",)))
    drained = plan_change(tenants, members, (), {}, 3, FleetChange(drain=("worker-05",)))
    assert drained.warmups == removed.warmups
    assert drained.moved_placements == removed.moved_placements
    assert drained.per_worker == removed.per_worker  # removed workers stay listed too, at 0 after
    assert drained.per_worker["worker-05"][1] == 0
    back = plan_change(tenants, members, ("worker-05",), {}, 3, FleetChange(undrain=("worker-05",)))
    assert sorted(back.warmups) == sorted((t, "worker-05") for t, _ in drained.warmups)


def test_a_worker_named_in_two_changes_and_a_size_over_the_limit_are_refused(fleet16):
    tenants, members = fleet16
    w = members[0].worker_id
    with pytest.raises(ValueError, match="named more than once"):
        plan_change(tenants, members, (), {}, 3, FleetChange(drain=(w,), undrain=(w,)))
    with pytest.raises(ValueError, match="named more than once"):
        plan_change(tenants, members, (), {}, 3, FleetChange(remove=(w,), drain=(w,)))
    with pytest.raises(ValueError, match="between 1 and 1024"):
        plan_change(tenants, members, (), {}, 3, FleetChange(set_size=((tenants[0], 1025),)))


def test_set_size_only_touches_that_tenant(fleet16):
    tenants, members = fleet16
    t0 = tenants[123]
    p = plan_change(tenants, members, (), {t0: 2}, 2, FleetChange(set_size=((t0, 4),)))
    full = shard_for(t0, members, 4)
    assert p.warmups == [(t0, full[2]), (t0, full[3])]
    assert p.moved_placements == 0 and p.tenants_changed == 1
    assert p.placements_after == p.placements_before + 2
    shrink = plan_change(tenants, members, (), {}, 3, FleetChange(set_size=((t0, 1),)))
    assert shrink.warmups == [] and shrink.moved_placements == 2 and shrink.tenants_changed == 1


def test_combined_change_and_json(fleet16):
    tenants, members = fleet16
    change = FleetChange(add=(FleetChange.parse_worker("w-new@zone-a"),), remove=("worker-01",),
                         drain=("worker-02",), undrain=("worker-03",),
                         set_size=((tenants[0], 5), (tenants[1], 1)))
    p = plan_change(tenants, members, ("worker-03",), {tenants[1]: 4}, 2, change)
    check_against_shard_for(p, tenants, members, {"worker-03"}, {tenants[1]: 4}, 2, change)
    j = p.to_json()
    assert json.loads(json.dumps(j)) == j
    assert j["warmups"]["count"] == len(p.to_warm) and j["warmups"]["truncated"] == (len(p.to_warm) > 1000)
    assert len(j["warmups"]["entries"]) == min(1000, len(p.to_warm))
    assert set(j["per_worker"]) == {m.worker_id for m in members} | {"w-new"}


def test_short_shards_counted_after(fleet16):
    tenants, members = fleet16
    small = members[:3]
    p = plan_change(tenants[:50], small, (), {tenants[0]: 3, tenants[1]: 2}, 3,
                    FleetChange(drain=("worker-01",)))
    assert p.short_shard_tenants == 49  # everyone but tenants[1] wants 3 of 2 live workers


@pytest.mark.parametrize("change, state, match", [
    (FleetChange(remove=("nope",)), {}, "remove worker 'nope'"),
    (FleetChange(drain=("nope",)), {}, "drain worker 'nope'"),
    (FleetChange(undrain=("worker-01",)), {}, "not draining"),
    (FleetChange(drain=("worker-01",)), {"draining": ("worker-01",)}, "already draining"),
    (FleetChange(add=(Member("worker-01"),)), {}, "already exists"),
    (FleetChange(remove=("worker-01", "worker-01")), {}, "named more than once"),
    (FleetChange(set_size=(("tenant-000001", 0),)), {}, "between 1 and 1024"),
    (FleetChange(set_size=(("ghost", 2),)), {}, "ghost"),
    (FleetChange(set_size=(("tenant-000001", 2), ("tenant-000001", 3))), {}, "twice"),
    (FleetChange(), {"default_k": 0}, "default_k"),
    (FleetChange(), {"sizes": {"tenant-000002": -1}}, "tenant-000002"),
    (FleetChange(), {"draining": ("ghost",)}, "ghost"),
    (FleetChange(), {"tenants": ["a", "b", "a"]}, "duplicate tenant id 'a'"),
])
def test_bad_input(fleet16, change, state, match):
    tenants, members = fleet16
    with pytest.raises(ValueError, match=match):
        plan_change(state.get("tenants", tenants[:10]), members, state.get("draining", ()), state.get("sizes", {}),
                    state.get("default_k", 2), change)


def test_parse_worker():
    assert FleetChange.parse_worker("w7") == Member("w7")
    assert FleetChange.parse_worker("w7@zone-b") == Member("w7", "zone-b")
    for bad in ("", "@zone-b", "w7@", "w7@a@b", " w7", "w 7"):
        with pytest.raises(ValueError, match="worker spec"):
            FleetChange.parse_worker(bad)


def test_empty_change_moves_nothing(fleet16):
    tenants, members = fleet16
    p = plan_change(tenants, members, ("worker-02",), {tenants[5]: 6}, 3, FleetChange())
    assert (p.moved_placements, p.tenants_changed, p.warmups) == (0, 0, [])
    assert isinstance(p, ShardPlan)


# --- the property: plan_change == shard_for before and after -------------------------------

def check_against_shard_for(p, tenants, members, draining, sizes, default_k, change):
    def state(mem, drn, sz):
        live = [m for m in mem if m.worker_id not in drn]
        return live, {t: shard_for(t, live, sz.get(t, default_k)) for t in tenants}

    live_b, before = state(members, set(draining), dict(sizes))
    mem_a = [m for m in members if m.worker_id not in change.remove] + list(change.add)
    drn_a = (set(draining) - set(change.remove) | set(change.drain)) - set(change.undrain)
    sz_a = dict(sizes) | dict(change.set_size)
    live_a, after = state(mem_a, drn_a, sz_a)

    moved = sum(len(set(before[t]) - set(after[t])) for t in tenants)
    warm = [(t, w) for t in tenants for w in after[t] if w not in before[t]]
    assert p.tenants == len(tenants)
    assert p.placements_before == sum(map(len, before.values()))
    assert p.placements_after == sum(map(len, after.values()))
    assert p.moved_placements == moved
    assert p.tenants_changed == sum(set(before[t]) != set(after[t]) for t in tenants)
    assert p.warmups == warm  # tenant order, then shard order
    cb = Counter(w for s in before.values() for w in s)
    ca = Counter(w for s in after.values() for w in s)
    everyone = {m.worker_id for m in members} | {m.worker_id for m in change.add}
    assert p.per_worker == {w: (cb[w], ca[w]) for w in everyone}
    assert p.short_shard_tenants == sum(sz_a.get(t, default_k) > len(live_a) for t in tenants)


@st.composite
def fleet_and_change(draw):
    n = draw(st.integers(0, 8))
    zones = draw(st.integers(1, 3))
    members = [Member(f"w{i}", f"z{i % zones}") for i in range(n)]
    tenants = [f"t{i}" for i in range(draw(st.integers(0, 25)))]
    ids = [m.worker_id for m in members]
    draining = draw(st.sets(st.sampled_from(ids))) if ids else set()
    sizes = {t: draw(st.integers(1, 6)) for t in draw(st.sets(st.sampled_from(tenants)))} if tenants else {}
    default_k = draw(st.integers(1, 5))
    add = tuple(Member(f"new{i}", draw(st.sampled_from(["z0", "z1", "z9"]))) for i in range(draw(st.integers(0, 2))))
    remove = sorted(draw(st.sets(st.sampled_from(ids)))) if ids else []
    left = [w for w in ids if w not in remove] + [m.worker_id for m in add]
    drain_pool = [w for w in left if w not in draining]
    drain = sorted(draw(st.sets(st.sampled_from(drain_pool)))) if drain_pool else []
    undrain_pool = [w for w in left if w in draining]
    undrain = sorted(draw(st.sets(st.sampled_from(undrain_pool)))) if undrain_pool else []
    set_size = tuple((t, draw(st.integers(1, 6))) for t in sorted(draw(st.sets(st.sampled_from(tenants))))) if tenants else ()
    change = FleetChange(add=add, remove=tuple(remove), drain=tuple(drain), undrain=tuple(undrain), set_size=set_size)
    return tenants, members, draining, sizes, default_k, change


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet_and_change())
def test_plan_matches_shard_for(case):
    tenants, members, draining, sizes, default_k, change = case
    p = plan_change(tenants, members, draining, sizes, default_k, change)
    check_against_shard_for(p, tenants, members, draining, sizes, default_k, change)
