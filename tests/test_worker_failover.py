"""Losing a worker: the router fails over to the other shard member; the dead one leaves."""
from __future__ import annotations

from modelfleet.demo_models import sample_features
from version_service.membership import list_workers
from tests.fleet import predict, predictor

RESTORED_S = 1.0  # measured: at once (0.00 s); with gRPC's shared connection state, 1-3 s


def _acme_on_two_workers(fleet):
    """Tenant acme on a two-worker shard behind a router: the workers, the router, its stub, a row,
    the member that answers acme (affinity) and the other one."""
    fleet.register("acme", "v1", seed=1)
    workers = {w.name: w for w in fleet.start_workers([("w1", "default"), ("w2", "default")])}
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    first = fleet.wait_for(lambda: predict(stub, "acme", x), what="first predict").worker_id
    return workers, router, stub, x, first, "w2" if first == "w1" else "w1"


def test_sigkill_of_a_shard_member_is_absorbed_by_the_other(fleet):
    workers, router, stub, x, first, survivor = _acme_on_two_workers(fleet)

    workers[first].kill()  # no goodbye: its lease is still alive for a few seconds
    answers = [predict(stub, "acme", x, timeout=5).worker_id for _ in range(50)]
    assert answers == [survivor] * 50

    fleet.wait_for(lambda: [w.worker_id for w in list_workers(fleet.client, fleet.keys)] == [survivor],
                   timeout=fleet.lease_ttl + 5, what="the dead worker's lease to expire")
    assert predict(stub, "acme", x).worker_id == survivor


def test_sigterm_worker_leaves_membership_at_once(fleet):
    fleet.register("acme", "v1", seed=1)
    w1, _ = fleet.start_workers([("w1", "default"), ("w2", "default")])
    w1.signal(15)
    assert w1.popen.wait(15) == 0
    ids = [w.worker_id for w in list_workers(fleet.client, fleet.keys)]
    assert ids == ["w2"]  # revoked on the way out, not left for the lease to expire


def test_a_worker_restarted_at_its_address_gets_its_tenants_back_at_once(fleet):
    """A restarted container keeps its pod's IP and its worker id. The router talks to the new
    process at once: over a channel of its own (gRPC would otherwise share the dead process's
    connection state, in reconnect backoff) and with no ejection carried over from the dead one."""
    workers, router, stub, x, first, survivor = _acme_on_two_workers(fleet)
    port = workers[first].address.rpartition(":")[2]

    workers[first].kill()

    def ejected_twice() -> bool:  # traffic goes on meanwhile; the router backs off the dead address
        assert predict(stub, "acme", x, timeout=5).worker_id == survivor
        return f"router.worker_ejected worker={first} why=UNAVAILABLE backoff_s=2.0" in router.log()

    fleet.wait_for(ejected_twice, timeout=30, what="the router to eject the dead worker twice")
    fleet.start_worker(first, extra=("--port", port))
    fleet.wait_for(lambda: predict(stub, "acme", x, timeout=5).worker_id == first, timeout=RESTORED_S,
                   what="the restarted worker to answer for its tenant again")
    assert "Task was destroyed but it is pending" not in router.log()  # the dead stream's writer ended too
