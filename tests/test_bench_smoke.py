"""The benchmark's machinery at tiny scale: `python -m loadtest.bench --quick` end to end, the
naive server and the bare proxy answering exactly what LightGBM answers, and the locustfile
driving a real fleet headless."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import lightgbm
import numpy as np
import pytest

from loadtest import bench, bench_fleet_gen
from modelfleet import processes
from modelfleet.demo_models import sample_features
from modelfleet.store import LocalStore
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from tests.fleet import REPO_ROOT


def test_quick_bench_measures_all_four_paths(tmp_path):
    """Two routers side by side over two workers that share the naive server's memory: the
    router path's callers spread over both routers, with no errors; each cell measured in two
    segments, the paths taking turns."""
    out, records_file = tmp_path / "out", tmp_path / "records.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--rows", "1", "--duration", "0.4", "--rounds", "2",
         "--warmup", "0.1",
         "--mix-warmup", "0.3", "--max-tenants", "300", "--routers", "2", "--workers", "2", "--equal-memory",
         "--json", str(records_file), "--out", str(out)],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    records = json.loads(records_file.read_text())
    assert {r["path"] for r in records} == set(bench.PATHS)
    assert {r["mix"] for r in records} == {"warm", "zipf10k"} and {r["rows"] for r in records} == {1}
    for r in records:
        assert {"path", "mix", "rows", "concurrency", "rps", "p50_ms", "p99_ms", "errors", "requests",
                "cores"} <= r.keys()
        assert r["rps"] > 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0, r
        assert r["errors"] == 0, r
        assert r["cores"] == os.cpu_count() and r["routers"] == 2
        assert r["worker_cache_models"] == r["cache_models"] // 2  # --equal-memory: the fleet holds what naive holds
        assert r["rounds"] == len(r["segments"]) == 2 and all(s["rps"] > 0 for s in r["segments"])
        assert r["rps"] == pytest.approx(sum(s["rps"] for s in r["segments"]) / 2)
    zipf = [r for r in records if r["mix"] == "zipf10k"]
    assert all(r["tenants"] == 300 for r in zipf)
    assert any(r["miss_ratio"] for r in zipf), "the Zipf mix should miss the caches sometimes"
    assert json.loads((out / "bench.json").read_text()) == records
    assert (out / "bench.png").stat().st_size > 0
    assert "os.cpu_count" in done.stdout and "bare_proxy" in done.stdout
    assert "beats naive" in done.stdout  # the figures, cell by cell (bench.print_figures)
    assert "cells of 0.4 s in 2 round(s)" in done.stdout  # too short to judge the figures by, and it says so
    turns = [line.split()[1] for line in done.stderr.splitlines()
             if "round 2/2" in line and " warm " in line and "rows=1 " in line]
    assert turns == ["router", "bare_proxy", "naive", "direct"]  # round 2 starts where round 1's order shifts to
    primed = [line.split()[1:4] for line in done.stderr.splitlines() if line.startswith("[prime]")]
    # each server once per mix, before its first cell: 0.3 cache generations of 30 models (8 for the 8 warm tenants)
    assert primed == [["worker", "warm", "2"], ["naive", "warm", "2"], ["worker", "zipf10k", "9"],
                      ["naive", "zipf10k", "9"]]


@pytest.mark.parametrize("argv,says", [
    (["--concurrency", "0"], "--concurrency and --rows"),
    (["--rows", "0"], "--concurrency and --rows"),
    (["--duration", "0"], "--duration must be above 0"),
    (["--out", __file__], "is not a directory"),  # found before minutes of measuring, not after
    (["--json", str(REPO_ROOT)], "is a directory"),
])
def test_bad_bench_flags_are_usage_errors_before_anything_runs(capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("argv,says", [
    (["--tenants", "0"], "argument --tenants: expected a whole number >= 1, got '0'"),
    (["--versions", "-1"], "argument --versions: expected a whole number >= 1"),
    (["--templates", "0"], "argument --templates: expected a whole number >= 1"),  # was a ZeroDivisionError
    (["--processes", "0"], "argument --processes: expected a whole number >= 1"),
    (["--tenants", "many"], "argument --tenants: expected a whole number, got 'many'"),
    (["--dir", __file__], "exists and is not a directory"),  # found before the render pass, not after
])
def test_bad_fleet_gen_bench_flags_are_usage_errors(capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        bench_fleet_gen.parse_args(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_naive_server_and_bare_proxy_answer_what_lightgbm_answers(fleet, tmp_path):
    models = {"acme": fleet.register("acme", "v1", seed=3),
              "bin": fleet.register("bin", "v1", seed=4, objective="binary"),
              "multi": fleet.register("multi", "v1", seed=5, objective="multiclass")}
    store = LocalStore(fleet.store_dir)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"store": str(fleet.store_dir), "version": "v1",
                                    "tenants": {t: store.put_file(p).artifact for t, p in models.items()}}))
    worker, = fleet.start_workers([("w1", "default")])
    naive_proc, naive_address = bench.start_naive(manifest, 2, tmp_path / "naive.log", fleet.env())
    bare_proc, bare_address = bench.start_bare_proxy(worker.address, tmp_path / "bare.log", fleet.env())
    unary_proc, unary_address = bench.start_bare_proxy(  # forwarding raw bytes as unary calls
        worker.address, tmp_path / "bare-unary.log", dict(fleet.env(), MODELFLEET_WORKER_TRANSPORT="unary"))
    try:
        bench.wait_serving(naive_address, naive_proc, "naive_server")
        bench.wait_serving(bare_address, bare_proc, "bare_proxy")
        bench.wait_serving(unary_address, unary_proc, "bare_proxy, unary")
        naive = predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(naive_address))
        bare = predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(bare_address))
        bare_unary = predictor_pb2_grpc.PredictorStub(grpc.insecure_channel(unary_address))
        for tenant, path in models.items():
            booster = lightgbm.Booster(model_file=str(path))
            for rows in (1, 7):
                x = sample_features(rows, rows, 8)
                expected = np.ravel(booster.predict(x))
                for stub, version in ((naive, ""), (bare, "v1"), (bare_unary, "v1")):  # proxies: caller's version
                    answer = stub.Predict(predictor_pb2.PredictRequest(tenant_id=tenant, features=x.ravel().tolist(),
                                                                       version=version), timeout=10)
                    np.testing.assert_allclose(answer.predictions, expected, rtol=0, atol=1e-9)
                    assert answer.model_version == "v1"

        # Statuses pass through the proxy unchanged; the naive server has its own, same codes.
        for stub in (naive, bare, bare_unary):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(predictor_pb2.PredictRequest(tenant_id="nobody", features=[1.0] * 8, version="v1"),
                             timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(predictor_pb2.PredictRequest(tenant_id="acme", features=[1.0] * 5, version="v1"),
                             timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        processes.stop(naive_proc)
        processes.stop(bare_proc)
        processes.stop(unary_proc)


def test_locust_headless_run_against_a_real_fleet(fleet, tmp_path):
    # Only look for it: importing locust here would gevent-monkey-patch this whole pytest process
    # (subprocess, threading, socket), and a later fork would then abort in gRPC's fork handlers.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install locust)")
    for i in range(1, 6):
        fleet.register(f"demo-{i:04d}", "v1", seed=i, objective=("regression", "binary", "multiclass")[i % 3])
    fleet.start_workers([("w1", "default"), ("w2", "default")])
    router = fleet.start_router()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MODELFLEET_LOCUST_TENANTS="demo-0001..demo-0005")
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "4",
         "-t", "5s", "--host", router.address, "--csv", str(tmp_path / "locust"), "--only-summary"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "locust_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    predict = rows["Predict"]
    assert predict["Type"] == "grpc"
    assert int(predict["Request Count"]) > 0
    assert int(predict["Failure Count"]) == 0, (tmp_path / "locust_failures.csv").read_text()


def test_figures_compare_the_router_with_the_bare_proxy_and_the_naive_server():
    def rec(path, mix, rps, p99, conc=8):
        return {"path": path, "mix": mix, "rows": 1, "concurrency": conc, "rps": rps, "p99_ms": p99}

    records = [rec("router", "warm", 900, 10), rec("bare_proxy", "warm", 1000, 9), rec("naive", "warm", 1200, 8),
               rec("router", "zipf10k", 800, 20), rec("bare_proxy", "zipf10k", 1100, 19), rec("naive", "zipf10k", 700, 25),
               rec("router", "zipf100k", 700, 30), rec("bare_proxy", "zipf100k", 800, 40), rec("naive", "zipf100k", 720, 31),
               rec("router", "zipf10k", 500, 60, conc=32), rec("naive", "zipf10k", 400, 50, conc=32),
               rec("direct", "zipf100k", 900, 15, conc=32)]  # no router in the cell: no row
    got = {(f["mix"], f["concurrency"]): f for f in bench.figures(records)}
    assert set(got) == {("warm", 8), ("zipf10k", 8), ("zipf100k", 8), ("zipf10k", 32)}
    warm, z10, z100, z10_32 = got["warm", 8], got["zipf10k", 8], got["zipf100k", 8], got["zipf10k", 32]
    assert warm["rps_vs_bare_proxy"] == pytest.approx(0.9) and warm["hop_ok"] is True
    assert warm["beats_naive"] is None  # the naive comparison is for the miss-heavy mixes
    assert z10["rps_vs_bare_proxy"] == pytest.approx(800 / 1100) and z10["hop_ok"] is False  # < 0.8 x
    assert z10["rps_vs_naive"] == pytest.approx(800 / 700) and z10["p99_vs_naive"] == pytest.approx(0.8)
    assert z10["beats_naive"] is True
    assert z100["beats_naive"] is False  # fewer rps than the naive server, though a lower p99
    assert z10_32["rps_vs_bare_proxy"] is None and z10_32["hop_ok"] is None  # no bare proxy in that cell
    assert z10_32["beats_naive"] is False  # more rps, but a higher p99


@pytest.mark.parametrize(("seconds", "rounds", "captioned"), [(1.0, 1, True), (6.0, 1, True), (2.0, 3, True),
                                                              (6.0, 3, False), (12.0, 4, False)])
def test_figures_of_short_cells_say_they_are_noisy(capsys, seconds, rounds, captioned):
    """A --quick run's one-second cells can mark a NO that 6 s in 3 rounds does not: the verdict
    table says how long its cells were measured, and what the figures are judged with."""
    records = [{"path": p, "mix": "zipf10k", "rows": 1, "concurrency": 8, "rps": rps, "p99_ms": 10.0,
                "duration_s": seconds, "rounds": rounds}
               for p, rps in (("router", 700.0), ("bare_proxy", 1000.0), ("naive", 800.0))]
    bench.print_figures(records)
    shown = capsys.readouterr().out
    assert "NO" in shown  # 0.7 x the bare proxy
    caption = f"cells of {seconds:g} s in {rounds} round(s)"
    assert (caption in shown) is captioned
    assert ("judged with --duration 6 --rounds 3" in shown) is captioned


def test_a_benchmark_stopped_with_sigterm_removes_its_temp_dirs(tmp_path):
    """`timeout`, `kill` and a cancelled CI job send SIGTERM: the generated fleet (GBs at scale)
    goes as it does on Ctrl-C."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.bench_fleet_gen", "--tenants", "50000"], cwd=REPO_ROOT,
                            env=dict(os.environ, TMPDIR=str(scratch)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        processes.wait_for(lambda: any(scratch.rglob("*.txt")), 120, what="the fleet to be being written")
        proc.terminate()
        assert proc.wait(60) == 128 + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("setting,host,says", [
    ({"MODELFLEET_LOCUST_ROWS": "abc"}, ["--host", "127.0.0.1:1"], "error: MODELFLEET_LOCUST_ROWS='abc': "),
    ({"MODELFLEET_LOCUST_TENANTS": "t-5..t-1"}, ["--host", "127.0.0.1:1"], "error: MODELFLEET_LOCUST_TENANTS='t-5..t-1': "),
    ({}, [], "error: give the router's address with --host HOST:PORT or LOCUST_HOST"),  # was a traceback a user
])
def test_a_bad_locust_setting_is_one_line_naming_it(setting, host, says):
    env = {k: v for k, v in os.environ.items() if k != "LOCUST_HOST"}
    done = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-u", "2",
                           "-t", "1s", *host], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(REPO_ROOT), **setting), timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(says)


def _group_alive(pgid: int) -> list[str]:
    """The processes of process group `pgid` that are still running (zombies waiting for init
    to reap them are not): a stopped benchmark must leave none."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


def test_ctrl_c_while_measuring_stops_the_benchmark_cleanly(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group (the bench, its generators,
    etcd, workers, router, proxies): one line, exit 130, no traceback from any process, nothing
    left running, the temp dir gone. Interrupted mid-cell: the generators are stopped, not
    waited for."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = ["-m", "loadtest.bench", "--mixes", "warm", "--rows", "1", "--concurrency", "1", "--paths", "direct",
            "--duration", "30", "--warmup", "0", "--mix-warmup", "0", "--artifacts", "1", "--trees", "5",
            "--out", str(tmp_path / "out")]
    # As a shell's foreground job gets it: SIGINT not ignored, whatever this process does with it.
    sigint_default = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", sigint_default, *argv], cwd=REPO_ROOT, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(scratch)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # "[1/1] direct ..." is logged at the end of the cell: watch the set-up's last line
            seen.append(line)
            if line.startswith("set-up: etcd,"):
                break
        assert any(p.name.startswith("modelfleet-bench-") for p in scratch.iterdir()), seen
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(30) == 130, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.strip().splitlines() == ["interrupted: stopped the benchmark's processes and removed its temp dir"]
    assert _group_alive(proc.pid) == []
    assert list(scratch.iterdir()) == []
