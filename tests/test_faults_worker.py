"""Worker faults under load, on real processes: a SIGKILLed worker, a hung (SIGSTOPped) one.

- SIGKILL one of 3 workers during steady load: the router fails over on UNAVAILABLE at once,
  so <= 0.1 % of requests fail overall, and none after the dead worker's lease has expired.
- SIGSTOP one member of a tenant's shard: requests with a 2 s deadline still complete in time
  (the member's attempt timeout is its share of the deadline, then the other member is tried,
  and after 3 timeouts the hung worker is ejected: tried last); SIGCONT: a probe succeeds and
  the worker answers again.
"""
from __future__ import annotations

import signal
import time

import grpc
import pytest

from modelfleet.demo_models import sample_features
from sharding import Member, shard_for
from tests.fleet import predict, predictor
from tests.load import Load, p99_ms
from version_service.membership import list_workers

TENANTS = [f"t{i:02d}" for i in range(12)]
DEADLINE_S = 2.0
HANG_S = 6.0


def _kill_under_load(fleet, *, before: int, after: int, callers: int = 4) -> dict:
    for i, tenant in enumerate(TENANTS):
        fleet.register(tenant, "v1", seed=i % 3)
    workers = {p.name: p for p in fleet.start_workers([(f"w{n}", "default") for n in range(1, 4)])}
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    for tenant in TENANTS:
        fleet.wait_for(lambda: predict(stub, tenant, x), what="warm-up")

    with Load(router.address, TENANTS, x, callers=callers, timeout=DEADLINE_S) as load:
        fleet.wait_for(lambda: load.count(ok=True) >= before, timeout=60, what="steady load")
        victim = max(workers, key=lambda w: sum(o.detail == w for o in load.outcomes))  # the busiest
        killed_at = time.monotonic()
        workers[victim].kill()
        fleet.wait_for(lambda: victim not in {w.worker_id for w in list_workers(fleet.client, fleet.keys)},
                       timeout=fleet.lease_ttl + 10, what="the dead worker's lease to expire")
        expired_at = time.monotonic()
        fleet.wait_for(lambda: load.count(since=expired_at + 0.5, ok=True) >= after, timeout=60,
                       what="load after the lease expired")
    outcomes = list(load.outcomes)
    failed = [o for o in outcomes if not o.ok]
    # The router learns of the expiry from its watch a moment after etcd: +0.5 s margin.
    late = [o for o in failed if o.at >= expired_at + 0.5]
    during = [o for o in outcomes if killed_at <= o.at < expired_at]
    result = dict(total=len(outcomes), failed=len(failed), late=late, victim=victim,
                  failed_pct=100 * len(failed) / len(outcomes),
                  p99_before_ms=p99_ms([o.latency for o in outcomes if o.ok and o.at < killed_at]),
                  p99_during_ms=p99_ms([o.latency for o in during if o.ok]),
                  answered_by_victim_after=sum(o.detail == victim for o in outcomes if o.at > killed_at + 0.1),
                  failures=[o.detail for o in failed][:5])
    print(f"SIGKILL {victim}: {result['total']} requests, {result['failed']} failed "
          f"({result['failed_pct']:.3f} %), p99 before {result['p99_before_ms']:.1f} ms, "
          f"between kill and lease expiry {result['p99_during_ms']:.1f} ms ({len(during)} requests)")
    return result


def test_sigkill_of_one_of_three_workers_under_load(fleet):
    result = _kill_under_load(fleet, before=1000, after=1000)
    assert result["failed_pct"] <= 0.1, result
    assert result["late"] == [], result
    assert result["answered_by_victim_after"] == 0


@pytest.mark.soak
def test_soak_sigkill_of_one_of_three_workers_under_heavier_load(fleet):
    fleet.lease_ttl = 10
    result = _kill_under_load(fleet, before=20_000, after=20_000, callers=16)
    assert result["failed_pct"] <= 0.1, result
    assert result["late"] == [], result


def _ids(fleet) -> list[str]:
    return sorted(w.worker_id for w in list_workers(fleet.client, fleet.keys))


def two_members_for_a_hang(fleet):
    """Tenant "acme" on a 2-member shard, served once: (workers by name, stub, a row, the member
    that answered). The lease outlives a SIGSTOP: a hang, not a death."""
    fleet.lease_ttl = 60
    fleet.register("acme", "v1", seed=1)
    workers = {p.name: p for p in fleet.start_workers([("w1", "default"), ("w2", "default")])}
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    first = fleet.wait_for(lambda: predict(stub, "acme", x), what="first predict").worker_id
    return workers, stub, x, first


def test_a_hung_worker_is_routed_around_within_the_deadline_and_used_again_after_sigcont(fleet):
    workers, stub, x, first = two_members_for_a_hang(fleet)
    assert first == shard_for("acme", [Member("w1"), Member("w2")], 2)[0]  # affinity
    other = "w2" if first == "w1" else "w1"

    workers[first].signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        latencies, answered = [], []
        while time.monotonic() - stopped < HANG_S:  # load for a while, not a sleep
            started = time.perf_counter()
            response = predict(stub, "acme", x, timeout=DEADLINE_S)  # raises if the deadline is missed
            latencies.append(time.perf_counter() - started)
            answered.append(response.worker_id)
        assert set(answered) == {other}
        assert _ids(fleet) == ["w1", "w2"]  # still a member: only hung
        slow = sum(lat > 0.5 for lat in latencies)
        print(f"SIGSTOP {first} for {HANG_S:.0f} s: {len(answered)}/{len(answered)} answered by {other} within "
              f"{DEADLINE_S:.0f} s; max {max(latencies) * 1000:.0f} ms; {slow} paid an attempt timeout (3 to eject, "
              f"then failed probes); the rest median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
        assert max(latencies) < DEADLINE_S
        # 3 timeouts eject it; probes at +1 s (fails, back-off 2 s) and +4 s (fails, back-off 4 s).
        assert 4 <= slow <= 6, slow
    finally:
        workers[first].signal(signal.SIGCONT)

    resumed = time.monotonic()
    fleet.wait_for(lambda: predict(stub, "acme", x, timeout=DEADLINE_S).worker_id == first, timeout=40,
                   what="the resumed worker to answer again")
    print(f"SIGCONT {first}: answering again after {time.monotonic() - resumed:.1f} s")
    assert [predict(stub, "acme", x).worker_id for _ in range(10)] == [first] * 10  # affinity is back


def test_deadline_shorter_than_an_attempt_floor_goes_to_one_member_and_fails_as_deadline(fleet):
    """A hung only member and a tiny deadline: DEADLINE_EXCEEDED, not a confusing UNAVAILABLE."""
    fleet.lease_ttl = 60
    fleet.register("acme", "v1", seed=1)
    worker = fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    fleet.wait_for(lambda: predict(stub, "acme", x), what="first predict")
    worker.signal(signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as info:
            predict(stub, "acme", x, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        worker.signal(signal.SIGCONT)


@pytest.mark.parametrize("hedge", ["50", "auto"])
def test_hedging_answers_from_the_other_member_when_the_first_hangs(fleet, monkeypatch, hedge):
    """With ejection off, only the hedge saves these requests from paying the attempt timeout."""
    monkeypatch.setenv("MODELFLEET_HEDGE_AFTER_MS", hedge)
    monkeypatch.setenv("MODELFLEET_EJECT_AFTER_FAILURES", "0")
    workers, stub, x, first = two_members_for_a_hang(fleet)
    other = "w2" if first == "w1" else "w1"
    for _ in range(300):  # 'auto' learns this router's p95 from successful attempts
        assert predict(stub, "acme", x).worker_id == first
    workers[first].signal(signal.SIGSTOP)
    try:
        latencies = []
        for _ in range(10):  # within the hedge budget
            started = time.perf_counter()
            assert predict(stub, "acme", x, timeout=DEADLINE_S).worker_id == other
            latencies.append(time.perf_counter() - started)
    finally:
        workers[first].signal(signal.SIGCONT)
    print(f"hedge {hedge}: 10/10 answered by {other} while {first} hung; max {max(latencies) * 1000:.0f} ms "
          f"(the attempt timeout alone would be {DEADLINE_S / 2 * 1000:.0f} ms)")
    assert max(latencies) < 0.5
