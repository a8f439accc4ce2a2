"""Pin history, rollback, canary and shadow rollouts on a real fleet."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque

import grpc
import lightgbm
import numpy as np
import pytest
import xxhash

from modelfleet.cli.main import build_parser
from modelfleet.cli.rollout_status import lag
from modelfleet.demo_models import sample_features
from modelfleet.errors import FailedPrecondition, InvalidArgument
from modelfleet.v1 import predictor_pb2, router_admin_pb2, router_admin_pb2_grpc
from router.rollout import LATENCY_SAMPLE, Rollouts, in_canary
from version_service.schema import RouteRecord
from tests import cli_fork_server
from tests.fleet import predict, predictor, stats
from tests.tcp_proxy import PausableProxy
from tests.test_cli import cli
from version_service.membership import list_routers
from version_service.registry import default_actor

X = sample_features(1, 1)[0]


def test_history_records_who_when_what_and_why_and_rollback_uses_it(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    fleet.registry.pin("acme", "v1", actor="alice", reason="v2 drifts")
    fleet.registry.unpin("acme", actor="bob")
    fleet.register("acme", "v3", seed=3)
    assert fleet.registry.rollback("acme", actor="carol", reason="v3 is bad").serving == "v2"
    history = fleet.registry.history("acme")
    assert [(h.action, h.from_version, h.to_version) for h in history] == [
        ("register", "", "v1"), ("register", "v1", "v2"), ("pin", "v2", "v1"), ("unpin", "v1", "v2"),
        ("register", "v2", "v3"), ("rollback", "v3", "v2")]
    assert (history[2].actor, history[2].reason) == ("alice", "v2 drifts")
    assert history[-1].actor == "carol" and history[-1].at
    route, _ = fleet.registry.route("acme")
    assert route.pinned and route.serving == "v2"

    shown = json.loads(cli(fleet, "versions", "acme", "--history", "--json").stdout)
    assert [h["action"] for h in shown["history"]] == [h.action for h in history]
    done = cli(fleet, "pin", "acme", "v3", "--actor", "dave", "--reason", "fixed")
    assert done.returncode == 0, done.stderr
    assert fleet.registry.history("acme")[-1].actor == "dave"


def test_register_and_import_record_the_reason_given(fleet):
    """`--reason` on register and import reaches the history (it was accepted and dropped)."""
    done = cli(fleet, "register", "--tenant", "acme", "--version", "v1", "--model-file", str(fleet.model_file(1)),
               "--actor", "ci-bot", "--reason", "weekly retrain")
    assert done.returncode == 0, done.stderr
    manifest = fleet.root / "manifest.csv"
    manifest.write_text(f"tenant,version,artifact\nacme,v2,{fleet.model_file(2)}\n")
    done = cli(fleet, "import", str(manifest), "--reason", "backfill OPS-9")
    assert done.returncode == 0, done.stderr
    assert [(h.action, h.to_version, h.actor, h.reason) for h in fleet.registry.history("acme")] == [
        ("register", "v1", "ci-bot", "weekly retrain"), ("register", "v2", default_actor(), "backfill OPS-9")]


def test_the_history_table_shows_actors_and_reasons_as_text_not_markup(fleet):
    """A reason is anyone's text (the Python API, an older CLI): `[/]` once made `versions --history`
    end in a rich MarkupError traceback, and `[red]` vanished into styling."""
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    fleet.registry.pin("acme", "v1", actor="[bold]ops[/bold]", reason="[/] see [red]OPS-12[/red]")
    done = cli_fork_server.run(["versions", "acme", "--history"], {**fleet.env(), "COLUMNS": "300"})
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "[bold]ops[/bold]" in done.stdout and "[/] see [red]OPS-12[/red]" in done.stdout, done.stdout


def test_rollback_without_an_earlier_version_is_refused(fleet):
    fleet.register("acme", "v1", seed=1)
    with pytest.raises(FailedPrecondition, match="no earlier serving version"):
        fleet.registry.rollback("acme")


def test_rollout_rules(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    fleet.register("acme", "v3", seed=3)
    with pytest.raises(FailedPrecondition, match="already serves"):
        fleet.registry.start_rollout("acme", "v3", percent=5)
    with pytest.raises(InvalidArgument, match="percent"):
        fleet.registry.start_rollout("acme", "v2", percent=150)
    fleet.registry.start_rollout("acme", "v2", percent=5)
    with pytest.raises(FailedPrecondition, match="already has a rollout"):
        fleet.registry.start_rollout("acme", "v1", shadow=True)
    fleet.registry.start_rollout("acme", "v2", percent=10)  # the same version: the percentage changes
    assert fleet.registry.route("acme")[0].canary_percent == 10
    assert fleet.registry.abort("acme").canary is None
    with pytest.raises(FailedPrecondition, match="no rollout"):
        fleet.registry.promote("acme")
    fleet.registry.start_rollout("acme", "v2", shadow=True)
    route = fleet.registry.promote("acme")
    assert (route.serving, route.pinned, route.shadow) == ("v2", True, None)  # v3 is newer: promoting pins
    assert [h.action for h in fleet.registry.history("acme")][-5:] == [
        "canary 5%", "canary 10%", "abort", "shadow", "promote"]


def test_a_canary_takes_the_share_it_names_to_its_resolution_keyed_or_not(fleet):
    """Routers split keys into 10,000 buckets. 0.07 % took 8 of them (0.07 * 100 is 7.000000000000001),
    1e-9 % all of bucket 0 (0.01 %), while unkeyed requests got the exact share: now a percent is
    kept to 0.01, one below that is refused, and keyed and unkeyed requests take the same buckets."""
    bucket = lambda key: xxhash.xxh3_64_intdigest(f"acme\x00{key}".encode()) % 10_000  # noqa: E731
    edge = {bucket(f"user-{i}"): f"user-{i}" for i in range(200_000)}
    assert in_canary("acme", 0.07, edge[6]) and not in_canary("acme", 0.07, edge[7])
    assert in_canary("acme", 1.1, edge[109]) and not in_canary("acme", 1.1, edge[110])  # 110.00000000000001
    assert in_canary("acme", 100, edge[9_999]) and not in_canary("acme", 0.01, edge[1])
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    assert fleet.registry.start_rollout("acme", "v1", percent=0.014).canary_percent == 0.01  # as routers apply it
    for bad in (0.001, 0.0, -1.0, float("nan"), 100.5):
        with pytest.raises(InvalidArgument, match="from 0.01 to 100"):
            fleet.registry.start_rollout("acme", "v1", percent=bad)


def test_a_rollout_of_a_model_that_takes_other_rows_or_answers_other_outputs_is_refused(fleet):
    """Callers send one row width: a canary of a 10-feature model beside an 8-feature one failed its
    whole share (INVALID_ARGUMENT), and a shadow of a 3-class model every copy."""
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "wide", seed=2, num_features=10)
    fleet.register("acme", "classes", seed=3, objective="multiclass")
    fleet.registry.pin("acme", "v1")
    for version, kind, needle in (("wide", {"percent": 5}, "takes 10 features"),
                                  ("classes", {"shadow": True}, r"answers 3 output\(s\)")):
        with pytest.raises(FailedPrecondition, match=needle):
            fleet.registry.start_rollout("acme", version, **kind)
    assert fleet.registry.route("acme")[0].in_rollout == set()
    fleet.register("acme", "v2", seed=4)  # the same shape: fine, whatever its objective
    assert fleet.registry.start_rollout("acme", "v2", percent=5).canary == "v2"


def test_pinning_or_unpinning_onto_the_rollout_version_ends_the_rollout(fleet):
    """A canary or shadow of the version that serves would compare a version with itself."""
    for version, seed in (("v1", 1), ("v2", 2)):
        fleet.register("acme", version, seed=seed)
    fleet.registry.start_rollout("acme", "v1", shadow=True)
    route = fleet.registry.pin("acme", "v1")
    assert (route.serving, route.shadow, route.canary) == ("v1", None, None)
    assert fleet.registry.route("acme")[0].in_rollout == set()
    fleet.registry.start_rollout("acme", "v2", percent=20)  # pinned to v1, canary of the newest
    route = fleet.registry.unpin("acme")
    assert (route.serving, route.canary, route.canary_percent) == ("v2", None, None)


@pytest.fixture
def two_version_fleet(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)  # serving
    fleet.start_workers([("w1", "default"), ("w2", "default")])
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    fleet.wait_for(lambda: predict(stub, "acme", X), what="first predict")
    return fleet, router, stub


def test_a_5_percent_canary_gets_5_percent_and_keys_are_sticky(two_version_fleet):
    fleet, router, stub = two_version_fleet
    assert cli(fleet, "rollout", "acme", "v1", "--percent", "5").returncode == 0
    fleet.wait_for(lambda: any(predict(stub, "acme", X, metadata=(("x-modelfleet-key", f"k{i}"),)).model_version
                               == "v1" for i in range(200)), timeout=2, what="the canary to start")
    request = predictor_pb2.PredictRequest(tenant_id="acme", features=list(X))

    def versions(keys):
        answers = []
        for start in range(0, len(keys), 500):  # 500 in flight at a time
            futures = [stub.Predict.future(request, timeout=30, metadata=(() if k is None else
                                                                           (("x-modelfleet-key", k),)))
                       for k in keys[start:start + 500]]
            answers += [f.result().model_version for f in futures]
        return answers

    keyed = versions([f"user-{i}" for i in range(10_000)])  # with the unkeyed: the 20k requests #4 names
    share = keyed.count("v1") / len(keyed)
    assert 0.04 <= share <= 0.06, share
    again = versions([f"user-{i}" for i in range(1_000)])
    assert again == keyed[:1_000]  # the same key always lands on the same version
    unkeyed = versions([None] * 10_000)  # random: +-1 point is 4.6 standard deviations at 10k
    assert 0.04 <= unkeyed.count("v1") / len(unkeyed) <= 0.06
    canary_keys = [f"user-{i}" for i, v in enumerate(keyed) if v == "v1"][:3]
    serving_keys = [f"user-{i}" for i, v in enumerate(keyed) if v == "v2"][:2]
    for key in canary_keys + serving_keys:  # one feature for an 8-feature model: the worker refuses it
        with pytest.raises(grpc.RpcError) as refused:
            predict(stub, "acme", [1.0], metadata=(("x-modelfleet-key", key),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = json.loads(cli(fleet, "rollout", "acme", "--status", "--json").stdout)
    assert status["canary"] == "v1" and status["routers"] == 1
    assert status["canary_requests"] + status["serving_requests"] >= 21_000
    assert (status["canary_errors"], status["serving_errors"]) == (3, 2)  # a failing canary shows


def test_shadow_never_changes_a_response_and_is_measured(two_version_fleet):
    fleet, router, stub = two_version_fleet
    serving_model = lightgbm.Booster(model_file=str(fleet.model_file(2)))
    shadow_model = lightgbm.Booster(model_file=str(fleet.model_file(1)))
    assert cli(fleet, "rollout", "acme", "v1", "--shadow").returncode == 0
    rows = sample_features(9, 300)

    def status():
        return json.loads(cli(fleet, "rollout", "acme", "--status", "--json").stdout)

    fleet.wait_for(lambda: status()["shadow"] == "v1", timeout=2, what="the shadow to reach the router")
    for row in rows:
        answer = predict(stub, "acme", row)
        assert answer.model_version == "v2"
        np.testing.assert_allclose(answer.predictions, serving_model.predict(row.reshape(1, -1)), atol=1e-9)
    summary = fleet.wait_for(lambda: (s := status())["shadow_requests"] >= 290 and s, timeout=10,
                             what="shadow copies to be measured")
    assert summary["shadow_errors"] == 0 and summary["shadow_p99_ms"] > 0
    expected_diff = np.abs(serving_model.predict(rows) - shadow_model.predict(rows))
    assert summary["shadow_max_abs_diff"] == pytest.approx(expected_diff.max(), rel=1e-6)
    assert cli(fleet, "rollout", "acme", "--abort").returncode == 0


def test_a_rollout_started_again_counts_from_zero(two_version_fleet):
    """Abort a canary, start the same one again (v1 at 50 %): `rollout --status` counted the aborted
    rollout's requests and errors as the new one's, because a router told rollouts apart only by
    version and percentage."""
    fleet, router, stub = two_version_fleet
    with grpc.insecure_channel(router.address) as channel:
        admin = router_admin_pb2_grpc.RouterAdminStub(channel)
        seen = lambda: admin.Rollout(router_admin_pb2.RolloutStatusRequest(tenant_id="acme"), timeout=5)  # noqa: E731
        counted = lambda status: status.serving_requests + status.canary_requests  # noqa: E731
        fleet.registry.start_rollout("acme", "v1", percent=50)
        fleet.wait_for(lambda: seen().canary_version == "v1", timeout=5, what="the router to start the canary")
        for i in range(20):
            predict(stub, "acme", X, metadata=(("x-modelfleet-key", f"k{i}"),))
        assert counted(seen()) == 20
        fleet.registry.abort("acme")
        fleet.wait_for(lambda: seen().canary_version == "", timeout=5, what="the router to end the canary")
        fleet.registry.start_rollout("acme", "v1", percent=50)
        status = fleet.wait_for(lambda: (s := seen()).canary_version == "v1" and s, timeout=5,
                                what="the router to start the canary again")
        assert counted(status) == 0 and status.canary_percent == 50
        for i in range(5):
            predict(stub, "acme", X, metadata=(("x-modelfleet-key", f"k{i}"),))
        assert counted(seen()) == 5


def test_rollout_status_asks_routers_at_once_and_sums_none_that_lags_etcd(fleet, capsys, monkeypatch):
    """`rollout --status` asked routers one after another, 5 s each: two hung (SIGSTOP) routers cost
    10 s. And it summed every router's counts, a router whose view lagged etcd included (here its
    link to etcd is cut: it still holds the aborted rollout), so an earlier rollout's counts went
    into the current one's. No workers: a request no worker takes is counted all the same (its
    routing). Routers on the current rollout are summed as before (the canary and shadow tests)."""
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    fleet.registry.start_rollout("acme", "v1", percent=100)
    with PausableProxy(fleet.etcd_endpoint) as etcd_link:
        lagging, *hung = fleet.start_routers(3, each=[("--etcd", etcd_link.address)])
        # A router registers itself after it serves (status finds it there): all three, first.
        router_id = fleet.wait_for(lambda: len(listed := {r.address: r.router_id for r in list_routers(
            fleet.client, fleet.registry.keys)}) == 3 and listed, what="the three routers to register")
        stub = predictor(lagging.address)
        for _ in range(3):
            with pytest.raises(grpc.RpcError, match="no live workers"):
                predict(stub, "acme", X)
        etcd_link.pause()
        fleet.registry.abort("acme")
        new_id = fleet.registry.start_rollout("acme", "v1", percent=100).rollout_id
        for router in hung:
            router.signal(signal.SIGSTOP)

        def status(*argv: str) -> tuple[int, str, str, float]:
            """In this process: its time is the command's own, without an interpreter's start."""
            args = build_parser().parse_args(["rollout", "acme", "--status", "--etcd", fleet.etcd_endpoint,
                                              "--prefix", fleet.prefix, *argv])
            started = time.monotonic()
            code = args.handler(args)
            return code, *capsys.readouterr(), time.monotonic() - started

        code, out, err, took = status("--json", "--members-timeout", "1.0")
        assert took < 1.8, took  # one deadline for all; one after another takes 2 s and more
        summary = json.loads(out)
        assert code == 1 and summary["rollout_id"] == new_id
        assert (summary["routers"], summary["canary_requests"]) == (0, 0)  # nothing of the aborted rollout
        assert summary["routers_unanswered"] == sorted(router_id[r.address] for r in hung)
        assert all(f"router {router_id[r.address]} did not answer: DEADLINE_EXCEEDED" in err for r in hung), err
        [apart] = summary["routers_lagging"]
        assert (apart["router_id"], apart["canary_requests"]) == (router_id[lagging.address], 3)
        assert apart["why"] == f"on rollout {apart['rollout_id']}, etcd's is {new_id}"

        monkeypatch.setenv("MODELFLEET_MEMBERS_TIMEOUT", "0.2")  # the variable, as the flag
        monkeypatch.setenv("COLUMNS", "400")  # the tables unwrapped
        code, out, _, _ = status()
        assert code == 1 and "routers that lag etcd" in out and apart["why"] in out, out
        assert all(f"{router_id[r.address]} (DEADLINE_EXCEEDED)" in out for r in hung), out


def test_a_router_on_the_current_rollout_but_an_older_route_lags_too():
    """Same rollout, but the router has not applied the route's newest revision (a pin of another
    serving version, say): its serving counts are of the old route, so it lags. Pure."""
    route = RouteRecord(serving="v3", newest="v3", canary="v1", canary_percent=5.0, rollout_id="r1")
    seen = router_admin_pb2.RolloutStatusResponse(serving_version="v2", canary_version="v1", canary_percent=5.0,
                                                  rollout_id="r1", revision=41)
    assert lag(seen, route, 42) == "routing revision 41 is older than the route's 42"
    seen.revision = 42  # (an answer that says it has the revision but not its serving version)
    assert lag(seen, route, 42) == "serves v2, etcd's route serves v3"  # its counts compare other versions
    seen.serving_version = "v3"
    assert lag(seen, route, 42) is None
    seen.canary_percent = 10.0  # another canary than etcd's, whatever id it carries
    assert lag(seen, route, 42).startswith("on rollout r1")
    older = router_admin_pb2.RolloutStatusResponse(serving_version="v3", canary_version="v1", canary_percent=5.0)
    assert lag(older, route, 42) == "a router older than rollout ids: its counts cannot be told apart (upgrade it)"


def test_a_slow_shadow_gets_no_worker_ejected_and_stays_on_one_member(two_version_fleet):
    """A shadow version slow to load (a big model, a slow store) never answers its copies in time.
    Each copy was sent like a caller's request: past its attempt timeout it counted against the
    tenant's first worker, whom three such copies ejected from every shard it serves, and went on to
    the second member, which loaded the shadow model as well."""
    fleet, router, stub = two_version_fleet
    artifact = fleet.store_dir / fleet.registry.version("acme", "v1").artifact
    model = artifact.read_bytes()
    artifact.unlink()
    os.mkfifo(artifact)  # a load of v1 waits in open() until the test writes the model into it
    try:
        with grpc.insecure_channel(router.address) as channel:
            admin = router_admin_pb2_grpc.RouterAdminStub(channel)
            seen = lambda: admin.Rollout(router_admin_pb2.RolloutStatusRequest(tenant_id="acme"), timeout=5)  # noqa: E731
            fleet.registry.start_rollout("acme", "v1", shadow=True)
            fleet.wait_for(lambda: seen().shadow_version == "v1", timeout=5, what="the router to start the shadow")
            request = predictor_pb2.PredictRequest(tenant_id="acme", features=list(X))
            answers = [f.result() for f in [stub.Predict.future(request, timeout=5) for _ in range(4)]]
            assert {a.model_version for a in answers} == {"v2"}
            first = answers[0].worker_id
            fleet.wait_for(lambda: seen().shadow_errors == 4, timeout=5, what="the shadow copies to time out")
        status = json.loads(cli(fleet, "rollout", "acme", "--status", "--json").stdout)
        assert status["shadow_errors"] == status["shadow_requests"] == 4  # nothing compared: no |diff|, not 0
        assert status["shadow_max_abs_diff"] is None and status["shadow_mean_abs_diff"] is None
        assert "worker_ejected" not in router.log(), router.log()
        assert predict(stub, "acme", X).worker_id == first  # still the tenant's first member
    finally:
        with open(artifact, "wb") as fifo:  # lets the waiting load(s) go (EOF after the bytes)
            fifo.write(model)
    other = next(w for w in fleet.procs if w.name in ("w1", "w2") and w.name != first)
    assert stats(other.address).requests_total == 0  # no copy went on to the other member


def test_a_router_forgets_the_counts_of_rollouts_that_ended():
    """Each shadowed tenant's stats hold a ~32 KiB latency sample; a router kept them after the rollout
    ended, for every tenant ever shadowed (100k tenants: gigabytes). Then it swept them only when another
    rollout started here. Now a timer sweeps. Pure: the router's own bookkeeping, on a real event loop."""
    shadowed = RouteRecord(serving="v2", newest="v2", shadow="v1", rollout_id="r1")
    routes = {"a": shadowed, "b": shadowed.with_changes(rollout_id="r2"), "c": shadowed.with_changes(rollout_id="r3"),
              "d": shadowed.with_changes(rollout_id="r4")}

    async def main():
        rollouts = Rollouts(route_of=routes.get, forget_every_s=0.01)
        for tenant in ("a", "b", "c", "d"):
            rollouts.stats_for(tenant, routes[tenant]).latencies_ms.extend([1.0] * LATENCY_SAMPLE)
        routes["a"] = shadowed.with_changes(shadow=None, rollout_id=None)  # aborted, or promoted
        del routes["b"]  # the tenant is gone
        routes["d"] = routes["d"].with_changes(serving="v3")  # a newer version serves: compared with another
        rollouts.start()  # no rollout starts after these ended: the timer alone sweeps
        try:
            deadline = time.monotonic() + 5
            while set(rollouts.stats) != {"c"} and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert set(rollouts.stats) == {"c"}
            assert rollouts.stats_for("d", routes["d"]).latencies_ms == deque()  # its figures start again
        finally:
            await rollouts.close()
    asyncio.run(main())


def test_a_promote_whose_rollout_changed_after_it_read_it_is_a_conflict(fleet):
    """promote (like abort and rollback) read the route, then read it again to write: a rollout
    aborted and replaced between the two reads was promoted anyway (the aborted version served,
    the new shadow ended unseen). Now the write compares the read the decision was made on."""
    for version, seed in (("v1", 1), ("v2", 2), ("v3", 3)):
        fleet.register("acme", version, seed=seed)
    fleet.registry.start_rollout("acme", "v1", percent=10)
    env = dict(fleet.env(), MODELFLEET_FAILPOINT_DIR=str(fleet.root))
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "rollout", "acme", "--promote"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fleet.wait_for(lambda: list(fleet.root.glob("after_route_read.*.ready")), what="promote to read the route")
        fleet.registry.abort("acme", actor="bob")
        fleet.registry.start_rollout("acme", "v2", shadow=True, actor="bob")
    finally:
        for name in ("after_route_read", "before_route_write"):
            (fleet.root / f"{name}.go").touch()
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "changed concurrently" in stderr, stderr
    route, _ = fleet.registry.route("acme")
    assert (route.serving, route.shadow, route.canary) == ("v3", "v2", None)
    assert [h.action for h in fleet.registry.history("acme")][-3:] == ["canary 10%", "abort", "shadow"]


def test_rollout_cli_errors_are_clear(fleet):
    fleet.register("acme", "v1", seed=1)
    for argv, needle in ((("rollout", "acme", "v9", "--percent", "5"), "no version 'v9'"),
                         (("rollout", "acme", "v1"), "--percent P or --shadow"),
                         (("rollout", "acme", "--promote"), "no rollout to promote"),
                         (("rollout", "acme", "v1", "--percent", "5"), "already serves")):
        done = cli(fleet, *argv)
        assert done.returncode == 1 and needle in done.stderr, (argv, done.stderr)
