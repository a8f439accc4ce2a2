"""Routers and workers on jemalloc where the system has it (modelfleet.allocator): real processes
re-executed onto it with their PID, `--allocator system` kept on glibc's malloc, refusals for a
missing library and a bad value, and model sizes measured at load under jemalloc."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelfleet import allocator
from modelfleet.demo_models import sample_features
from modelfleet.errors import FailedPrecondition
from tests.fleet import REPO_ROOT, logged_line, predict, predictor

needs_jemalloc = pytest.mark.skipif(allocator.find_jemalloc() is None,
                                    reason="no jemalloc on this system (make jemalloc installs Debian's libjemalloc2)")


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@needs_jemalloc
def test_the_fleet_launcher_starts_routers_and_workers_on_jemalloc(fleet):
    fleet.register("acme", "v1", seed=1)
    worker, = fleet.start_workers([("w1", "default")])
    router = fleet.start_router(shard_size=1)
    for proc, serving in ((worker, "worker.serving"), (router, "router.serving")):
        assert "libjemalloc" in mapped_libraries(proc.popen.pid), proc.name
        assert "allocator=jemalloc" in logged_line(fleet, proc, serving)
    assert predict(predictor(router.address), "acme", sample_features(1, 1)[0]).predictions


def test_the_flag_wins_over_what_the_launcher_preloaded(fleet):
    """`--allocator system` on a child whose environment preloads jemalloc (auto): it re-executes
    without it, keeping the PID the fleet spawned, and serves on glibc's malloc."""
    fleet.register("acme", "v1", seed=1)
    worker = fleet.start_worker("w1", extra=("--allocator", "system"))
    router = fleet.start_router(shard_size=1, extra=("--allocator", "system"))
    for proc, serving in ((worker, "worker.serving"), (router, "router.serving")):
        assert "libjemalloc" not in mapped_libraries(proc.popen.pid), proc.name
        assert "allocator=system" in logged_line(fleet, proc, serving)
    assert predict(predictor(router.address), "acme", sample_features(1, 1)[0]).predictions


@needs_jemalloc
def test_a_process_started_without_the_preload_reexecutes_onto_jemalloc_keeping_its_pid():
    """What Kubernetes or an operator's shell starts: no LD_PRELOAD, MODELFLEET_ALLOCATOR unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MODELFLEET_ALLOCATOR")}
    script = "import os; from modelfleet import allocator; print(allocator.ensure('auto'), os.getpid())"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["jemalloc", str(proc.pid)]


def test_a_missing_jemalloc_is_refused_only_when_it_was_asked_for(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(allocator, "jemalloc_active", lambda: False)
    assert allocator.resolve("auto") == "system"
    assert allocator.resolve("system") == "system"
    assert allocator.ensure("auto") == "system"  # no library: runs on, never re-executes
    with pytest.raises(FailedPrecondition, match="no jemalloc library.*libjemalloc2"):
        allocator.resolve("jemalloc")
    with pytest.raises(FailedPrecondition, match="no jemalloc library"):
        allocator.ensure("jemalloc")


def test_an_unknown_allocator_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "modelfleet.cli", "worker", "--allocator", "tcmalloc"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "expected 'auto' or 'jemalloc' or 'system', got 'tcmalloc'" in done.stderr, done.stderr


@needs_jemalloc
def test_loads_under_jemalloc_are_measured_exactly_per_thread():
    """Under jemalloc a load is measured with its thread's own counters: the same text gives the
    same bytes every time, close to the structural estimate; and a worker's trim purges."""
    script = textwrap.dedent("""
        import json
        from modelfleet import allocator
        allocator.ensure("jemalloc")
        from modelfleet.demo_models import train_model_text
        from worker import predictor
        from worker.predictor import LoadedModel
        out = {"allocator": allocator.active(), "sizes": {}}
        for trees, leaves in ((5, 7), (60, 31)):
            text = train_model_text(seed=1, num_trees=trees, num_leaves=leaves)
            models = [LoadedModel.from_model_text(text) for _ in range(8)]
            out["sizes"][f"{trees}x{leaves}"] = {
                "nbytes": [m.nbytes for m in models],
                "estimate": predictor._estimate_nbytes(trees, trees * leaves)
                            + predictor._python_bytes(models[0].num_features, 1, predictor.ROW_PREDICT)}
            for m in models:
                m.close()
        out["measured"], out["estimated"] = predictor.sizing.measured, predictor.sizing.estimated
        from worker import memory
        out["trimmed"] = memory.trim()  # jemalloc's purge of every arena, not glibc's malloc_trim
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["allocator"] == "jemalloc"
    assert out["measured"] == 16 and out["estimated"] == 0  # one at a time: every load measured
    assert out["trimmed"] is True
    for shape, sizes in out["sizes"].items():
        assert len(set(sizes["nbytes"])) == 1, (shape, sizes)  # exact: no other thread's bytes in it
        assert 0.6 <= sizes["nbytes"][0] / sizes["estimate"] <= 1.6, (shape, sizes)


@needs_jemalloc
def test_the_launcher_reads_the_choice_as_the_child_will():
    """Any case, as the flag's parser takes it; a value the child will refuse is left to it."""
    assert "jemalloc" in allocator.preload_env({"MODELFLEET_ALLOCATOR": "JEMALLOC"})["LD_PRELOAD"]
    assert "LD_PRELOAD" not in allocator.preload_env({"MODELFLEET_ALLOCATOR": "System",
                                                      "LD_PRELOAD": allocator.find_jemalloc()})
    bogus = {"MODELFLEET_ALLOCATOR": "tcmalloc", "LD_PRELOAD": "libfoo.so"}
    assert allocator.preload_env(bogus) == bogus
