"""Session-wide real etcd on free loopback ports; per-test fleets under their own key prefix."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

# Every process the tests start inherits this: gRPC's C core prints INFO lines (a GOAWAY at a
# server's stop, ...) into the test log otherwise, from the processes that are not the modelfleet
# CLI (load generators, the naive server). Tests of the CLI's own choice remove it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import pytest  # noqa: E402

from modelfleet.artifact_check import ArtifactChecker
from modelfleet.etcd_server import EtcdServer
from tests.fleet import Fleet


@pytest.fixture(scope="session")
def etcd(tmp_path_factory) -> EtcdServer:
    """One real etcd for the whole run; tests isolate themselves by key prefix."""
    root = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(data_dir=root / "data", log_path=root / "etcd.log").start()
    yield server
    server.cleanup()


def new_prefix() -> str:
    return f"/mf-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def artifact_checker() -> ArtifactChecker:
    """One artifact-checking child for every test fleet's registry, instead of one per fleet (~0.4 s each)."""
    checker = ArtifactChecker()
    yield checker
    checker.close()


@pytest.fixture
def fleet(etcd: EtcdServer, tmp_path: Path, artifact_checker: ArtifactChecker) -> Fleet:
    """A fresh, empty fleet (no processes yet) under its own etcd prefix."""
    f = Fleet(etcd.endpoint, new_prefix(), tmp_path, checker=artifact_checker)
    yield f
    f.stop()


@pytest.fixture
def own_etcd_fleet(tmp_path: Path, artifact_checker: ArtifactChecker) -> tuple[EtcdServer, Fleet]:
    """A fleet on an etcd of its own, for tests that stop and start etcd."""
    server = EtcdServer(data_dir=tmp_path / "etcd", log_path=tmp_path / "etcd.log").start()
    f = Fleet(server.endpoint, new_prefix(), tmp_path / "fleet", lease_ttl=3, checker=artifact_checker)
    yield server, f
    f.stop()
    server.cleanup()
