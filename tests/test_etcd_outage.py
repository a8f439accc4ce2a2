"""etcd stops for 20 s under load: every Predict still succeeds; admin writes fail clearly;
after etcd returns, a pin made then reaches the router within seconds, with no failures either."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from modelfleet.errors import FailedPrecondition
from modelfleet.oip import grpc_service_pb2 as pb
from modelfleet.oip import grpc_service_pb2_grpc
from modelfleet.store import LocalStore
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc
from tests.fleet import predict, serve_and_warm
from tests.test_cli import cli
from version_service.membership import list_workers
from worker.loading import ModelLoader

OUTAGE_S = 20.0
RECOVERY_S = 5.0


def test_router_serves_through_an_etcd_outage_and_follows_changes_after(own_etcd_fleet):
    etcd, fleet = own_etcd_fleet
    tenants = ["a", "b", "c"]
    for i, tenant in enumerate(tenants):
        fleet.register(tenant, "v1", seed=i)
    fleet.register("a", "v2", seed=10)  # a serves v2
    workers, router, stub, x = serve_and_warm(fleet, tenants)
    oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(router.address))
    assert oip.ModelMetadata(pb.ModelMetadataRequest(name="c"), timeout=5).inputs  # read before the outage
    fleet.register("d", "v1", seed=20)
    fleet.register("d", "v2", seed=21)
    fleet.registry.start_rollout("d", "v1", percent=100)  # a canary no worker has loaded yet
    admin = router_admin_pb2_grpc.RouterAdminStub(grpc.insecure_channel(router.address))
    fleet.wait_for(lambda: admin.Rollout(router_admin_pb2.RolloutStatusRequest(tenant_id="d"),
                                         timeout=5).canary_version == "v1", what="the canary to reach the router")

    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            for tenant in tenants:
                try:
                    predict(stub, tenant, x, timeout=5)
                    served[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{tenant}: {exc.code().name} {exc.details()}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        etcd.stop()
        outage_started = time.monotonic()
        done = cli(fleet, "pin", "a", "v1", timeout=60)  # an admin write while etcd is down
        assert done.returncode == 1 and "unavailable" in done.stderr, done.stderr
        # No router list and no current rollout to judge the routers by: one line, no traceback.
        done = cli(fleet, "rollout", "d", "--status", timeout=60)
        assert done.returncode == 1 and done.stderr.startswith("error: etcd at ") and done.stderr.count("\n") == 1
        assert "unavailable while listing routers" in done.stderr, done.stderr
        # The Open Inference Protocol serves too: ModelInfer reads nothing from etcd (b never
        # went through it before), metadata read before the outage is answered from the router.
        request = pb.ModelInferRequest(model_name="b")
        request.inputs.add(name="features", datatype="FP64", shape=[1, 8]).contents.fp64_contents.extend(x)
        assert len(oip.ModelInfer(request, timeout=5).outputs[0].contents.fp64_contents) == 1
        assert list(oip.ModelMetadata(pb.ModelMetadataRequest(name="c"), timeout=5).inputs[0].shape) == [-1, 8]
        # The canary's artifact digest is in the route too: its first load needs no etcd.
        assert predict(stub, "d", x, timeout=5).model_version == "v1"
        before = served[0]
        fleet.wait_for(lambda: time.monotonic() - outage_started >= OUTAGE_S, timeout=OUTAGE_S + 30,
                       what="the outage to last 20 s")
        served_during = served[0] - before
        etcd.start()
        fleet.wait_for(lambda: fleet.registry.pin("a", "v1"), timeout=30, what="etcd to accept writes again")
        # Channels to etcd retry every second at most (etcd_client.RECONNECT_OPTIONS): the router
        # follows the change within seconds, and the workers keep their leases (no failures after).
        fleet.wait_for(lambda: predict(stub, "a", x).model_version == "v1", timeout=RECOVERY_S,
                       what="the pin to propagate")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert served_during > 100
    for worker in workers:  # their watch of gc's tombstones (worker.retirements): one warning, then back
        fleet.wait_for(lambda: "retirement_watch.reconnected" in worker.log(), worker,
                       f"{worker.name}'s retirement watch to reconnect", timeout=RECOVERY_S)
        assert worker.log().count("retirement_watch.disconnected") == 1
    for worker in workers:  # no live worker: no model is ready for inferencing (KServe V2)
        worker.signal(signal.SIGTERM)
    fleet.wait_for(lambda: not oip.ModelReady(pb.ModelReadyRequest(name="a"), timeout=5).ready,
                   what="ModelReady to follow the workers out")


def test_a_worker_joining_through_an_etcd_stall_goes_live(own_etcd_fleet, monkeypatch):
    """etcd stalls after the worker registered as joining and warmed up: going live is retried
    until etcd answers, rather than the worker exiting."""
    etcd, fleet = own_etcd_fleet
    fleet.register("a", "v1", seed=1)
    fleet.start_worker("w1")
    monkeypatch.setenv("MODELFLEET_FAILPOINT_DIR", str(fleet.root))  # held before going live
    joiner = fleet.spawn("w2", ["worker", "--worker-id", "w2", "--lease-ttl", str(fleet.lease_ttl)])
    fleet.wait_for(lambda: any(fleet.root.glob("before_going_live.*.ready")), joiner, "w2 to be about to go live")
    assert any(w.worker_id == "w2" and w.joining for w in list_workers(fleet.client, fleet.keys))
    etcd.proc.send_signal(signal.SIGSTOP)
    try:
        (fleet.root / "before_going_live.go").touch()
        fleet.wait_for(lambda: "step=go_live" in joiner.log(), joiner, "w2 to retry going live", timeout=60)
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
    live = fleet.wait_for(lambda: next((w for w in list_workers(fleet.client, fleet.keys)
                                        if w.worker_id == "w2" and not w.joining), None),
                          joiner, "w2 to go live once etcd answers", timeout=60)
    assert live.address and joiner.alive()


def test_a_worker_keeps_a_record_it_read_through_an_outage_and_a_missing_artifact(own_etcd_fleet):
    """A load whose artifact is missing asks etcd whether the version is gone; etcd away, the
    record the worker read before must stay, so the model loads again once the artifact is back."""
    etcd, fleet = own_etcd_fleet
    fleet.register("acme", "v1", seed=1)
    loader = ModelLoader(fleet.client, fleet.keys, LocalStore(fleet.store_dir))
    loader.load("acme", "v1").close()
    artifact = fleet.store_dir / fleet.registry.version("acme", "v1").artifact
    etcd.stop()
    try:
        artifact.rename(artifact.with_suffix(".away"))
        with pytest.raises(FailedPrecondition, match="missing"):
            loader.load("acme", "v1")
        artifact.with_suffix(".away").rename(artifact)
        loader.load("acme", "v1").close()  # before: Unavailable, the record forgotten
    finally:
        etcd.start()
