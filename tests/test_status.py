"""`modelfleet status --once --json` against a running fleet; the live view under tmux-like use."""
from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from modelfleet.cli.main import build_parser
from modelfleet.demo_models import sample_features
from tests.fleet import predict, predictor
from tests.test_cli import cli


def test_status_reports_workers_routers_models_and_revision(fleet, capsys):
    """Last, two hung (SIGSTOP) members, a worker and a router: status asked the members one after
    another, 2 s each, so they cost 4 s a refresh; all are now asked at once under one deadline."""
    fleet.register("a", "v1", seed=1)
    fleet.register("b", "v1", seed=2)
    w1 = fleet.start_worker("w1", zone="z1", cache_bytes=64 << 20)
    fleet.start_worker("w2", zone="z2")
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    for _ in range(3):
        for tenant in ("a", "b"):
            predict(stub, tenant, sample_features(1, 1)[0])
    done = cli(fleet, "status", "--once", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    workers = {w["worker_id"]: w for w in doc["workers"]}
    assert set(workers) == {"w1", "w2"} and workers["w1"]["zone"] == "z1"
    assert workers["w1"]["bytes_budget"] == 64 << 20
    assert sum(w["predictions"] for w in workers.values()) == sum(w["requests"] for w in workers.values()) == 6
    assert sum(w["models"] for w in workers.values()) == 2
    assert all(abs(w["hit_rate"] - 2 / 3) < 1e-3 for w in workers.values() if w["predictions"])
    assert all(w["shed"] == w["negative_hits"] == w["admission_rejections"] == w["artifact_mismatches"] == 0
               for w in workers.values())
    (r,) = doc["routers"]
    _, meta = fleet.client.get(fleet.keys.route("b"))
    assert r["etcd_connected"] and r["revision"] >= meta.mod_revision and r["tenants"] == 2
    with pytest.raises(grpc.RpcError) as refused:  # reaches a worker, which finds no such version
        predict(stub, "a", sample_features(1, 1)[0], version="v9")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    workers = json.loads(cli(fleet, "status", "--once", "--json").stdout)["workers"]
    assert sum(w["requests"] for w in workers) == 7 and sum(w["predictions"] for w in workers) == 6
    table = cli(fleet, "status", "--once")
    assert table.returncode == 0 and "w2" in table.stdout and "connected" in table.stdout
    locked = fleet.start_router(shard_size=1, extra=("--auth", "1"))  # status brings no key: this one refuses it
    done = cli(fleet, "status", "--once", "--json")
    errors = [r.get("error") for r in json.loads(done.stdout)["routers"]]
    assert done.returncode == 1 and sorted(errors, key=str) == [None, "UNAUTHENTICATED"], done.stdout

    hung = (w1, router)
    for member in hung:
        member.signal(signal.SIGSTOP)
    try:  # in this process: its time is the command's own, without an interpreter's start
        args = build_parser().parse_args(["status", "--once", "--json", "--etcd", fleet.etcd_endpoint,
                                          "--prefix", fleet.prefix, "--members-timeout", "1.0"])
        started = time.monotonic()
        code = args.handler(args)
        took = time.monotonic() - started
    finally:
        for member in hung:
            member.signal(signal.SIGCONT)
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and took < 1.8, took  # one deadline for all; one after another takes 2 s and more
    assert {w["worker_id"]: w.get("error") for w in doc["workers"]} == {"w1": "DEADLINE_EXCEEDED", "w2": None}
    assert {r["address"]: r.get("error") for r in doc["routers"]} == {router.address: "DEADLINE_EXCEEDED",
                                                                      locked.address: "UNAUTHENTICATED"}
