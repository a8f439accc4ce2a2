"""Bulk import from a manifest: registration, resume after a kill, loud conflicts, rejects."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modelfleet import processes
from modelfleet.errors import InvalidArgument
from version_service.bulk_import import read_manifest
from tests.test_cli import cli
from tests.test_up import children_of


def write_manifest(fleet, rows: int, name: str = "manifest.csv", seeds: int = 5) -> str:
    lines = ["tenant,version,artifact"]
    for i in range(rows):
        lines.append(f"t{i:05d},v1,models/{fleet.model_file(i % seeds).name}")
    path = fleet.root / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_import_registers_every_row_and_rerunning_skips_them(fleet):
    manifest = write_manifest(fleet, 300)
    done = cli(fleet, "import", manifest, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["registered"], result["already_registered"], result["artifacts"]) == (300, 0, 5)
    routes = fleet.registry.tenants()
    assert len(routes) == 300 and routes["t00123"].serving == "v1"
    assert fleet.registry.history("t00123")[0].reason == "import"
    again = json.loads(cli(fleet, "import", manifest, "--json").stdout)
    assert (again["registered"], again["already_registered"], again["artifacts_new"]) == (0, 300, 0)


def test_jsonl_manifest_with_a_new_version(fleet):
    write_manifest(fleet, 3)
    path = fleet.root / "more.jsonl"
    path.write_text("".join(json.dumps({"tenant": f"t{i:05d}", "version": "v2",
                                        "artifact": str(fleet.model_file(10 + i))}) + "\n" for i in range(3)))
    assert cli(fleet, "import", str(fleet.root / "manifest.csv")).returncode == 0
    assert cli(fleet, "import", str(path)).returncode == 0
    assert {t: r.serving for t, r in fleet.registry.tenants().items()} == {f"t{i:05d}": "v2" for i in range(3)}


def test_same_version_with_a_different_artifact_stops_the_import_loudly(fleet):
    assert cli(fleet, "import", write_manifest(fleet, 50)).returncode == 0
    path = fleet.root / "conflict.csv"
    path.write_text(f"tenant,version,artifact\nt00001,v1,models/{fleet.model_file(99).name}\n")
    done = cli(fleet, "import", str(path))
    assert done.returncode == 1
    assert "line 2" in done.stderr and "t00001" in done.stderr and "different artifact" in done.stderr


def test_a_killed_import_resumes_where_it_stopped(fleet):
    manifest = write_manifest(fleet, 4000, seeds=3)
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "import", manifest, "--json"], env=fleet.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fleet.wait_for(lambda: len(fleet.registry.tenants()) >= 400, timeout=120, what="the import to be under way")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = len(fleet.registry.tenants())
    assert 400 <= partial < 4000
    done = cli(fleet, "import", manifest, "--json", timeout=300)
    result = json.loads(done.stdout)
    assert result["registered"] + result["already_registered"] == 4000
    assert result["already_registered"] >= partial
    assert len(fleet.registry.tenants()) == 4000


def test_a_killed_import_leaves_no_checker_processes(fleet):
    """The pool that checks new artifacts dies with the import, even when the import is SIGKILLed."""
    manifest = write_manifest(fleet, 40, seeds=6)
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "import", manifest], env=fleet.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pool_processes() -> list[int]:
        found = []
        for pid in children_of(proc.pid):
            try:
                if b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    try:
        pool = fleet.wait_for(pool_processes, timeout=60, what="the import's checker pool to start")
    finally:
        proc.kill()
        proc.wait(10)
    fleet.wait_for(lambda: not any(processes.pid_alive(pid) for pid in pool), timeout=30,
                   what=f"the checker processes {pool} to exit with the import")


def test_unusable_artifacts_are_rejected_and_the_rest_registered(fleet):
    junk = fleet.root / "models" / "junk.txt"
    junk.write_text("tree\nversion=v4\nnot really a model\n")
    path = fleet.root / "mixed.csv"
    path.write_text(f"tenant,version,artifact\ngood,v1,models/{fleet.model_file(1).name}\nbad,v1,models/junk.txt\n")
    done = cli(fleet, "import", str(path))
    assert done.returncode == 1 and "1 artifacts were rejected" in done.stderr
    assert set(fleet.registry.tenants()) == {"good"}


@pytest.mark.parametrize("content,needle", [
    ("tenant,version\nt,v1\n", "needs tenant, version and artifact"),
    ("tenant,version,artifact\nbad/id,v1,x.txt\n", "invalid tenant id"),
    ("tenant,version,artifact\nt,v1,s3://bucket/key\n", "only paths and file:// URIs"),
    ("tenant,version,artifact\n", "has no rows"),
    ('{"tenant": "t", "version": \n', "not JSON lines"),
    ("tenant,version,artifact\nt,v1\n", "must each be a non-empty string"),  # a short row
    ('{"tenant": "t", "version": "v1", "artifact": 7}\n', "must each be a non-empty string"),
    ("tenant,version,artifact\nt,v1," + "x" * 200_000 + "\n", "not a usable CSV manifest"),  # over csv's limit
])
def test_bad_manifests_are_refused_before_anything_happens(tmp_path, content, needle):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=needle):
        read_manifest(path)


def test_demo_fleet_then_import_then_predict(fleet):
    import lightgbm
    import numpy as np

    from modelfleet.demo_models import sample_features
    from tests.fleet import predict, predictor

    out = fleet.root / "synthetic"
    done = cli(fleet, "demo-fleet", "--tenants", "40", "--out", str(out), "--versions", "2")
    assert done.returncode == 0, done.stderr
    manifest = done.stdout.strip()
    again = cli(fleet, "demo-fleet", "--tenants", "10", "--out", str(out))  # would overwrite models, mix manifests
    assert again.returncode == 1 and "is not empty" in again.stderr and "--force" in again.stderr
    assert cli(fleet, "import", manifest).returncode == 0
    assert len(fleet.registry.tenants()) == 40
    fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1)
    x = sample_features(3, 2, 8)
    answer = predict(predictor(router.address), "tenant-000007", x.reshape(-1))
    assert answer.model_version == "v2"
    expected = lightgbm.Booster(model_file=str(out / "models" / "07" / "tenant-000007-v2.txt")).predict(x)
    np.testing.assert_allclose(answer.predictions, np.asarray(expected).reshape(-1), atol=1e-9)


def test_a_file_rewritten_after_its_check_is_rejected_and_never_stored(fleet, monkeypatch, tmp_path):
    """An import stores only the bytes it hashed and checked: a file rewritten after its check is
    a rejected row, and its new bytes stay out of the store (where being stored means checked);
    the other rows import."""
    import hashlib
    import threading

    from modelfleet.store import artifact_for
    from version_service.bulk_import import import_manifest

    for seed in (1, 2):
        (tmp_path / f"m{seed}.txt").write_bytes(fleet.model_file(seed).read_bytes())
    (tmp_path / "manifest.csv").write_text("tenant,version,artifact\nacme,v1,m1.txt\nbeta,v1,m2.txt\n")
    rows = read_manifest(tmp_path / "manifest.csv")
    changed = rows[1].source
    cut = changed.read_bytes()[:1000]  # as by a copy still being written
    monkeypatch.setenv("MODELFLEET_FAILPOINT_DIR", str(fleet.root))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=import_manifest(fleet.registry, rows, "test")))
    thread.start()
    try:
        fleet.wait_for(lambda: any(fleet.root.glob("before_import_store.*.ready")), what="the files to be checked")
        changed.write_bytes(cut)
    finally:
        (fleet.root / "before_import_store.go").touch()
        thread.join(60)
    result = outcome["result"]
    assert result.rejected == [f"{changed}: changed while it was being imported; import it again"]
    assert (result.registered, result.artifacts_new) == (1, 1)
    assert set(fleet.registry.tenants()) == {rows[0].tenant}
    assert not fleet.registry.store.exists(artifact_for(hashlib.sha256(cut).hexdigest()))
