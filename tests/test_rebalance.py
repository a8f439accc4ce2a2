"""Rebalancing a live fleet: drain, make-before-break warm-ups, shard sizes, zones, agreement."""
from __future__ import annotations

import argparse
import json
import signal
import socket
import time

import grpc
import pytest

from modelfleet.cli import shards
from modelfleet.demo_models import sample_features
from modelfleet.errors import Conflict
from modelfleet.rebalance import Warmup, active_models, run_warmups
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc, worker_pb2
from sharding import Member, shard_for
from sharding.plan import FleetChange
from tests.fleet import predict, predictor, stats, worker_stub
from version_service.schema import DrainRecord, WorkerRecord
from tests.test_cli import cli

X = sample_features(1, 1)[0]


def router_shard(address: str, tenant: str) -> tuple[str, ...]:
    with grpc.insecure_channel(address) as channel:
        stub = router_admin_pb2_grpc.RouterAdminStub(channel)
        return tuple(stub.Shard(router_admin_pb2.ShardRequest(tenant_id=tenant), timeout=5).workers)


def loaded(address: str) -> set[str]:
    return {m.tenant_id for m in stats(address, include_models=True).models}


def test_drain_warms_the_new_member_first_then_moves_traffic_and_undrain_restores(fleet):
    fleet.register("acme", "v1", seed=1)
    workers = {w.name: w for w in fleet.start_workers([(w, "default") for w in ("w1", "w2", "w3")])}
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    first, second = router_shard(router.address, "acme")
    assert predict(stub, "acme", X).worker_id == first  # affinity: active on its first member
    newcomer = ({"w1", "w2", "w3"} - {first, second}).pop()
    assert "acme" not in loaded(workers[newcomer].address)

    plan = json.loads(cli(fleet, "shards", "plan", "--drain", first, "--json").stdout)
    assert (plan["warmups"]["count"], plan["warmups"]["new_first_members"]) == (2, 1)  # what apply will warm
    done = cli(fleet, "workers", "drain", first, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    # make-before-break: loaded before any request is routed there, on the new member and on the
    # old second member, which becomes first and so takes the traffic (it never held the model:
    # affinity sent everything to the first member)
    assert summary["warmups"] == 2 and summary["loaded"] == 2
    assert "acme" in loaded(workers[newcomer].address) and "acme" in loaded(workers[second].address)
    fleet.wait_for(lambda: first not in router_shard(router.address, "acme"), timeout=1.0, what="drain to apply")
    assert router_shard(router.address, "acme") == (second, newcomer)  # rendezvous order: the old second leads
    loads = stats(workers[second].address).loads_total
    for _ in range(20):
        assert predict(stub, "acme", X).worker_id == second
    assert stats(workers[second].address).loads_total == loads  # no cold load once traffic moved
    state = {w["worker_id"]: w["state"] for w in json.loads(cli(fleet, "workers", "--json").stdout)}
    assert state[first] == "drained"

    assert cli(fleet, "workers", "undrain", first).returncode == 0
    fleet.wait_for(lambda: router_shard(router.address, "acme")[0] == first, timeout=1.0, what="undrain")


def test_a_joining_worker_warms_the_active_tenants_it_will_own_before_going_live(fleet):
    tenants = [f"t{i:02d}" for i in range(16)]
    for i, tenant in enumerate(tenants):
        fleet.register(tenant, "v1", seed=1 + i % 3)
    fleet.start_workers([("w1", "default"), ("w2", "default")])
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    for tenant in tenants:
        predict(stub, tenant, X)
    new = fleet.start_worker("w3")  # its own --shard-size is 2: it warms with the routers' 1
    fleet.wait_for(lambda: "w3" in [m.worker_id for m in _live(fleet)], what="w3 to go live")
    live = [Member(w) for w in ("w1", "w2", "w3")]
    owned = {t for t in tenants if shard_for(t, live, 1) == ("w3",)}
    assert owned, "the test needs w3 to own some tenants"
    assert loaded(new.address) == owned  # warmed exactly what it took over, before taking traffic
    fleet.wait_for(lambda: all(router_shard(router.address, t) == ("w3",) for t in owned), timeout=1.0,
                   what="routers to route to w3")
    for tenant in owned:
        assert predict(stub, tenant, X).worker_id == "w3"
    assert stats(new.address).loads_total == len(owned)  # no cold load when traffic arrived


def _live(fleet):
    from version_service.membership import read_fleet
    from version_service.schema import live_members

    workers, drains = read_fleet(fleet.client, fleet.keys)
    return live_members(workers, drains)


def test_shard_size_change_reaches_every_router_within_a_second(fleet):
    fleet.register("hot", "v1", seed=1)
    fleet.start_workers([(w, "default") for w in ("w1", "w2", "w3", "w4")])
    routers = fleet.start_routers(2, shard_size=2)
    assert all(len(router_shard(r.address, "hot")) == 2 for r in routers)
    fleet.register("hot", "v2", seed=2)
    fleet.registry.start_rollout("hot", "v1", percent=10)
    fleet.registry.set_limits("hot", rate=500)
    before = fleet.registry.route("hot")[0]
    done = cli(fleet, "shards", "apply", "--set-size", "hot", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert fleet.registry.route("hot")[0] == before.with_changes(shard_size=4)  # rollout, limits, digest kept
    for r in routers:
        fleet.wait_for(lambda: len(router_shard(r.address, "hot")) == 4, timeout=1.0, what="size 4 on every router")
    assert cli(fleet, "set-shard-size", "hot", "default").returncode == 0
    for r in routers:
        fleet.wait_for(lambda: len(router_shard(r.address, "hot")) == 2, timeout=1.0, what="default size")


def test_routers_cli_and_plan_agree_on_every_shard_and_zones_spread(fleet):
    tenants = [f"tenant-{i:03d}" for i in range(40)]
    for tenant in tenants:
        fleet.register(tenant, "v1", seed=1)
    zones = {"w1": "a", "w2": "a", "w3": "a", "w4": "b", "w5": "b"}
    fleet.start_workers(list(zones.items()))
    routers = fleet.start_routers(2, shard_size=3)  # not the CLI's default (2): it plans with what routers use
    shards = {t: router_shard(routers[0].address, t) for t in tenants}
    for tenant in tenants:
        assert router_shard(routers[1].address, tenant) == shards[tenant] and len(shards[tenant]) == 3
        assert {zones[w] for w in shards[tenant]} == {"a", "b"}  # one member per zone, then the next
    for tenant in tenants[:5]:  # the CLI runs the same function in another process
        cli_shard = json.loads(cli(fleet, "shard", tenant, "--json").stdout)
        assert tuple(w["worker_id"] for w in cli_shard["workers"]) == shards[tenant]
    refused = cli(fleet, "shard", tenants[0], "--shard-size", "2")
    assert refused.returncode == 1 and "the routers run with --shard-size 3" in refused.stderr
    plan = json.loads(cli(fleet, "shards", "plan", "--drain", "w1", "--json").stdout)
    per_worker_before = {w: sum(w in s for s in shards.values()) for w in zones}
    assert {w: c["before"] for w, c in plan["per_worker"].items()} == per_worker_before
    assert plan["per_worker"]["w1"]["after"] == 0
    assert plan["moved_placements"] == per_worker_before["w1"]


@pytest.mark.parametrize("argv,needle", [
    (("shards", "plan", "--drain", "nope"), "nope"),
    (("shards", "plan", "--drain", "w1", "--undrain", "w1"), "named more than once"),
    (("shards", "apply", "--add-worker", "w9@z"), "joins by starting it"),
    (("shards", "apply"), "nothing to apply"),
    (("workers", "drain", "ghost"), "ghost"),
    (("shards", "report"), "nothing to report"),
])
def test_bad_rebalance_requests_are_one_clear_error(fleet, argv, needle):
    fleet.register("t", "v1", seed=1)
    fleet.client.put(fleet.keys.worker("w1"), '{"worker_id":"w1","address":"127.0.0.1:1"}')
    done = cli(fleet, *argv)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and needle in done.stderr, done.stderr


def test_no_drain_leaves_the_fleet_without_a_live_worker(fleet):
    """Alone: the last live worker's drain is refused. Side by side: each of two drains planned on
    the same state leaves a live worker, both together would leave none, so the second conflicts."""
    fleet.register("acme", "v1", seed=1)
    fleet.start_workers([("w1", "default"), ("w2", "default")])
    stale = shards.read_state(argparse.Namespace(etcd=fleet.etcd_endpoint, prefix=fleet.prefix))
    assert cli(fleet, "workers", "drain", "w1").returncode == 0  # commits after `stale` was read
    with pytest.raises(Conflict, match="changed concurrently"):
        shards.commit(stale, FleetChange(drain=("w2",)), [Member("w1", "default")])
    done = cli(fleet, "workers", "drain", "w2")
    assert done.returncode == 1 and "leaves no live worker (live now: w2)" in done.stderr, done.stderr
    rows = {w["worker_id"]: w for w in json.loads(cli(fleet, "workers", "--json").stdout)}
    assert {w: r["state"] for w, r in rows.items()} == {"w1": "drained", "w2": "live"}
    assert rows["w1"]["drain"]["since"] and rows["w1"]["drain"]["actor"] and "drain" not in rows["w2"]
    # A drain is not leased: it outlives its worker's process, is shown, and can be lifted.
    w1 = next(p for p in fleet.procs if p.name == "w1")
    w1.signal(signal.SIGTERM)
    assert w1.popen.wait(15) == 0
    state = {w["worker_id"]: w["state"] for w in json.loads(cli(fleet, "workers", "--json").stdout)}
    assert state == {"w1": "drained (not running)", "w2": "live"}
    done = cli(fleet, "workers", "--json", "undrain", "w1")  # the parent's --json holds for the action
    assert done.returncode == 0 and json.loads(done.stdout) == {"applied": True, "undrained_not_running": "w1"}
    assert fleet.client.get(fleet.keys.drain("w1"))[0] is None


def test_a_change_whose_warm_ups_cannot_reach_a_worker_is_not_committed_unless_forced(fleet):
    """w1 is drained (with a reason), then hangs (SIGSTOP; its lease outlives the test). Undraining
    it would put w1 in acme's shard without acme's model, which only a reachable w1 could load:
    refused with exit 1, one line naming w1 and the count, a --json summary, the drain untouched;
    --force commits and says so."""
    fleet.lease_ttl = 60
    fleet.register("acme", "v1", seed=1)
    workers = {p.name: p for p in fleet.start_workers([("w1", "default"), ("w2", "default")])}
    worker_stub(workers["w2"].address).Warm(worker_pb2.WarmRequest(tenant_id="acme", version="v1"), timeout=10)
    done = cli(fleet, "workers", "drain", "w1", "--reason", "kernel upgrade (OPS-12)")  # acme active on w2
    assert done.returncode == 0, done.stderr
    drain_key = fleet.keys.drain("w1")
    drained = fleet.client.get(drain_key)[0]
    record = DrainRecord.from_json(drained)
    assert record.reason == "kernel upgrade (OPS-12)" and record.actor and record.since

    workers["w1"].signal(signal.SIGSTOP)
    try:
        refused = cli(fleet, "workers", "undrain", "w1", "--warm-timeout", "0.3", "--json")
        error = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 1 and error.startswith("error: not applied: 1 of 1 warm-ups could not reach "
                                                            "their worker (w1: 1)") and "--force" in error, refused.stderr
        summary = json.loads(refused.stdout)
        assert (summary["applied"], summary["unreachable_workers"]) == (False, {"w1": 1})
        assert [(f["tenant"], f["worker"]) for f in summary["warmup_failed"]] == [("acme", "w1")]
        assert fleet.client.get(drain_key)[0] == drained  # not committed: the same drain record
        shown = cli(fleet, "workers")
        assert "drained" in shown.stdout and "by " + record.actor + ": kernel upgrade (OPS-12)" in shown.stdout

        forced = cli(fleet, "workers", "undrain", "w1", "--warm-timeout", "0.3", "--force")
        assert forced.returncode == 0, forced.stderr
        said = " ".join(forced.stdout.split())  # rich wraps lines at 80 columns when not on a terminal
        assert "applied with --force" in said and "could not reach their worker (w1: 1)" in said, said
        assert fleet.client.get(drain_key)[0] is None
    finally:
        workers["w1"].signal(signal.SIGCONT)


def test_only_a_worker_that_cannot_be_reached_counts_against_a_change(fleet):
    """A version that does not exist fails on any worker (NOT_FOUND: the model's failure, which
    does not stop a change); a worker that is not registered is unreachable (one that does not
    answer in time: the test above)."""
    fleet.register("acme", "v1", seed=1)
    w1 = fleet.start_worker("w1")
    warmups = [Warmup("acme", "v1", "w1"), Warmup("acme", "v404", "w1"), Warmup("acme", "v1", "gone")]
    result = run_warmups(warmups, {"w1": w1.address})
    assert (result.loaded, result.already_warm, len(result.failed)) == (1, 0, 2)
    assert result.unreachable == {"gone": 1}
    assert {wu.version: why for wu, why in result.failed} == {"v404": "tenant 'acme' has no version 'v404'",
                                                              "v1": "worker gone is not registered"}


def test_what_the_workers_serve_is_read_from_all_of_them_at_once():
    """A joining worker (and `shards apply`) reads what every other worker serves. Asked one after
    another, each hung worker cost the whole timeout: four took 2 s of a join's warm-up budget."""
    hung = [socket.socket() for _ in range(4)]  # accept connections (the backlog), never answer
    try:
        for sock in hung:
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
        workers = [WorkerRecord(f"w{i}", f"127.0.0.1:{sock.getsockname()[1]}") for i, sock in enumerate(hung)]
        started = time.monotonic()
        assert active_models(workers, 60, timeout=0.5) == {}
        assert time.monotonic() - started < 1.4  # one deadline for all
    finally:
        for sock in hung:
            sock.close()
