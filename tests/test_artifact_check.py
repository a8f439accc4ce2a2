"""The artifact checker's child: kept for many checks, and replaced after a crash, a hang or idling."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from modelfleet import processes
from modelfleet.artifact_check import ArtifactChecker, ModelInfo
from modelfleet.demo_models import train_model_text
from modelfleet.errors import FailedPrecondition
from modelfleet.store import LocalStore
from version_service.etcd_client import connect
from version_service.registry import Registry
from version_service.schema import Keys


def _model(tmp_path: Path, seed: int, objective: str = "regression") -> Path:
    path = tmp_path / f"{objective}-{seed}.txt"
    path.write_text(train_model_text(seed, num_features=5, objective=objective))
    return path


@pytest.fixture
def make_checker():
    """ArtifactChecker(**kwargs), each closed after the test."""
    made: list[ArtifactChecker] = []

    def make(**kwargs) -> ArtifactChecker:
        made.append(ArtifactChecker(**kwargs))
        return made[-1]

    yield make
    for checker in made:
        checker.close()


@pytest.fixture
def checker(make_checker):
    return make_checker(timeout=30)


def test_one_child_checks_many_artifacts_and_outlives_the_bad_ones(checker, tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("this is not a model")
    assert checker.check(_model(tmp_path, 1)) == ModelInfo(num_features=5, num_classes=1, objective="regression")
    with pytest.raises(FailedPrecondition, match=r"junk.txt is not a usable LightGBM model: it is not a LightGBM"):
        checker.check(junk)
    with pytest.raises(FailedPrecondition, match="not a usable LightGBM model"):
        checker.check(tmp_path / "missing.txt")
    assert checker.check(_model(tmp_path, 2, "binary")) == ModelInfo(5, 1, "binary")
    assert checker.check(_model(tmp_path, 3, "multiclass")) == ModelInfo(5, 3, "multiclass")
    assert checker.children_started == 1


def _check_in_thread(checker: ArtifactChecker, path: Path) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            outcome.append(checker.check(path))
        except FailedPrecondition as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_crash_refuses_that_artifact_and_the_next_check_gets_a_fresh_child(checker, tmp_path):
    checker.check(_model(tmp_path, 1))
    first = checker.child_pid
    fifo = tmp_path / "blocks.txt"
    os.mkfifo(fifo)
    thread, outcome = _check_in_thread(checker, fifo)
    with open(fifo, "w"):  # returns once the child has opened the artifact: it is checking it now
        os.kill(first, signal.SIGSEGV)
        thread.join(30)
    assert isinstance(outcome[0], FailedPrecondition)
    assert "blocks.txt is not a usable LightGBM model: loading it crashed LightGBM (SIGSEGV)" in str(outcome[0])
    _replaced(checker, first, tmp_path)


def test_a_hang_is_killed_at_the_timeout_and_the_next_check_gets_a_fresh_child(make_checker, tmp_path):
    checker = make_checker(timeout=1.5)
    checker.check(_model(tmp_path, 1))
    first = checker.child_pid
    fifo = tmp_path / "hangs.txt"
    os.mkfifo(fifo)  # nobody ever writes: opening it blocks the child
    with pytest.raises(FailedPrecondition, match="hangs.txt is not a usable LightGBM model: loading it did not "
                                                 "finish within 1.5s"):
        checker.check(fifo)
    _replaced(checker, first, tmp_path)


def test_an_idle_child_exits_and_the_next_check_starts_another(make_checker, tmp_path):
    checker = make_checker(timeout=30, idle_exit_s=0.3)
    checker.check(_model(tmp_path, 1))
    first = checker.child_pid
    processes.wait_for(lambda: checker.child_pid is None, 10, what="the idle child to exit")
    _replaced(checker, first, tmp_path)


def _replaced(checker: ArtifactChecker, first: int, tmp_path: Path) -> None:
    """The first child is gone, and the next check works in a second one."""
    assert not processes.pid_alive(first)
    assert checker.check(_model(tmp_path, 2)).num_features == 5
    assert checker.children_started == 2 and checker.child_pid != first


def test_close_ends_the_child(checker, tmp_path):
    checker.check(_model(tmp_path, 1))
    pid = checker.child_pid
    checker.close()
    assert checker.child_pid is None and not processes.pid_alive(pid)


def test_a_registry_checks_every_new_artifact_in_one_child(fleet):
    started = fleet.registry.checker.children_started  # the tests' fleets share one checker
    for seed in range(4):
        fleet.register(f"t{seed}", "v1", seed=seed)
    with pytest.raises(FailedPrecondition):
        fleet.registry.register("t9", "v1", Path(__file__))
    assert fleet.registry.checker.children_started - started <= 1


def test_a_registry_closes_only_the_checker_it_owns(etcd, tmp_path, artifact_checker):
    client = connect(etcd.endpoint)
    try:
        own = Registry(client, Keys("/mf-test/own"), LocalStore(tmp_path / "store"))
        shared = Registry(client, Keys("/mf-test/shared"), LocalStore(tmp_path / "store"), checker=artifact_checker)
        model = _model(tmp_path, 1)
        own.register("a", "v1", model)
        shared.register("a", "v1", _model(tmp_path, 2))
        own_pid, shared_pid = own.checker.child_pid, artifact_checker.child_pid
        own.close()
        shared.close()
        assert not processes.pid_alive(own_pid) and own.checker.child_pid is None
        assert artifact_checker.child_pid == shared_pid and processes.pid_alive(shared_pid)
    finally:
        client.close()
