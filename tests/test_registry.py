"""The registry on a real etcd: register, newest serves, pin/unpin, CAS conflicts, validation."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading

import pytest

from modelfleet.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, NotFound
from modelfleet.store import artifact_for, sha256_file
from tests.test_cli import cli


def test_register_records_artifact_and_serves_newest(fleet):
    path = fleet.register("acme", "v1", seed=1)
    route, _ = fleet.registry.route("acme")
    assert (route.serving, route.newest, route.pinned) == ("v1", "v1", False)
    record = fleet.registry.version("acme", "v1")
    assert record.sha256 == sha256_file(path)
    assert record.num_features == 8 and record.num_classes == 1 and record.bytes == path.stat().st_size
    assert record.objective == "regression" and record.created
    stored = fleet.store_dir / record.artifact
    assert stored.read_bytes() == path.read_bytes()

    fleet.register("acme", "v2", seed=2, objective="multiclass")
    route, _ = fleet.registry.route("acme")
    assert (route.serving, route.newest) == ("v2", "v2")
    assert [v.version for v in fleet.registry.versions("acme")] == ["v1", "v2"]
    assert fleet.registry.version("acme", "v2").num_classes == 3


def test_register_is_idempotent_and_refuses_a_different_artifact(fleet):
    fleet.register("acme", "v1", seed=1)
    record, created = fleet.registry.register("acme", "v1", fleet.model_file(1))
    assert not created and record.version == "v1"
    with pytest.raises(AlreadyExists, match="different artifact"):
        fleet.registry.register("acme", "v1", fleet.model_file(2))


def test_registering_a_stored_artifact_again_repairs_a_damaged_copy(fleet):
    """A register that finds its artifact stored skips the check (the same digest was checked when
    stored) but not the store's own look: a copy damaged since (same size even) is written again,
    so the version it records can load."""
    path = fleet.register("a", "v1", seed=1)
    stored = fleet.store_dir / fleet.registry.version("a", "v1").artifact
    stored.write_bytes(b"x" * stored.stat().st_size)
    fleet.registry.register("b", "v1", path)
    assert stored.read_bytes() == path.read_bytes()


def test_register_and_import_read_a_stored_model_once(fleet):
    """A file whose artifact is stored is read once (version_service.artifact_intake): its digest,
    its header and any repair of the stored copy come from that one read. Each command read it
    twice before, and hashed it twice and the stored copy once (~3 ms a hash of a 4 MB model);
    the stored copy is now read once and compared, not hashed."""
    import os

    from version_service.bulk_import import ManifestRow, import_manifest

    path = fleet.register("a", "v1", seed=1)
    stored = fleet.store_dir / fleet.registry.version("a", "v1").artifact
    opened: list[str] | None = []

    def count_opens(event: str, args: tuple) -> None:
        if opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(count_opens)  # for the rest of the process: inert once `opened` is None
    try:
        fleet.registry.register("b", "v1", path)
        import_manifest(fleet.registry, [ManifestRow(2, "c", "v1", path)], "test")
        reads = list(opened)
    finally:
        opened = None
    assert (reads.count(str(path)), reads.count(str(stored))) == (2, 2), reads  # one each for each command
    assert [fleet.registry.version(t, "v1").sha256 for t in "abc"] == [stored.stem] * 3


def test_pin_holds_through_new_versions_and_unpin_returns_to_newest(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    assert fleet.registry.pin("acme", "v1").serving == "v1"
    fleet.register("acme", "v3", seed=3)
    route, _ = fleet.registry.route("acme")
    assert (route.serving, route.newest, route.pinned) == ("v1", "v3", True)
    assert fleet.registry.unpin("acme").serving == "v3"


def test_pin_unknown_version_or_tenant_is_not_found(fleet):
    fleet.register("acme", "v1", seed=1)
    with pytest.raises(NotFound, match="'acme' has no version 'v9'"):
        fleet.registry.pin("acme", "v9")
    with pytest.raises(NotFound, match="unknown tenant 'nobody'"):
        fleet.registry.unpin("nobody")


def test_concurrent_pins_one_wins_the_other_gets_a_conflict(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    # Both admins read the route at the same revision, then write: exactly one may win.
    original = fleet.registry.route
    barrier = threading.Barrier(2)

    def route_then_wait(tenant):
        result = original(tenant)
        barrier.wait(timeout=10)
        return result

    fleet.registry.route = route_then_wait
    outcomes: dict[str, object] = {}

    def pin(version):
        try:
            outcomes[version] = fleet.registry.pin("acme", version)
        except Conflict as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=pin, args=(v,)) for v in ("v1", "v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    fleet.registry.route = original
    conflicts = [v for v, o in outcomes.items() if isinstance(o, Conflict)]
    winners = [v for v, o in outcomes.items() if not isinstance(o, Conflict)]
    assert len(conflicts) == 1 and len(winners) == 1, outcomes
    assert "changed concurrently" in str(outcomes[conflicts[0]])
    route, _ = original("acme")
    assert route.serving == winners[0] and route.pinned


def test_a_pin_racing_the_collection_of_its_version_fails_not_found(fleet):
    """gc removes versions without touching the route; a pin that read the version before must
    not commit a route onto a version whose record and artifact are gone."""
    for n in range(1, 5):
        fleet.register("acme", f"v{n}", seed=n)
    env = dict(fleet.env(), MODELFLEET_FAILPOINT_DIR=str(fleet.root))
    pin = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "pin", "acme", "v1"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fleet.wait_for(lambda: any(fleet.root.glob("before_route_write.*.ready")), what="the pin to have read v1")
    gc = cli(fleet, "gc", "--keep", "2", "--tenant", "acme", "--yes", "--json")
    assert json.loads(gc.stdout)["removed_versions"] == 2, gc.stderr  # v1 and v2
    (fleet.root / "before_route_write.go").touch()
    assert pin.wait(60) == 1
    assert pin.stderr.read() == "error: tenant 'acme' has no version 'v1'\n"
    route, _ = fleet.registry.route("acme")
    assert (route.serving, route.pinned) == ("v4", False)


@pytest.mark.parametrize("swapped", ["before_the_check", "after_the_check"])
def test_a_model_file_rewritten_while_being_registered_is_refused_and_nothing_is_stored(fleet, monkeypatch, tmp_path,
                                                                                       swapped):
    """What is hashed, what the checker's child loads and what the store copies must be the same
    bytes: a rewrite between any two (a half-written model can crash the workers that load it) is
    refused, CONFLICT, and neither etcd nor the store gets it. A store holding unchecked bytes
    would let a later register of them skip the check (being stored means being checked).
    before_the_check: the checker loads other bytes, then the file is put back as it was hashed."""
    model = tmp_path / "model.txt"
    original = fleet.model_file(1).read_bytes()
    other = fleet.model_file(2).read_bytes()  # a usable model too: only the digests tell them apart
    model.write_bytes(original)
    monkeypatch.setenv("MODELFLEET_FAILPOINT_DIR", str(fleet.root))
    (fleet.root / "before_register_write.go").touch()  # were it reached
    outcome = {}

    def register() -> None:
        try:
            outcome["record"] = fleet.registry.register("acme", "v1", model)
        except Exception as exc:  # noqa: BLE001 - the assertions say which
            outcome["error"] = exc

    thread = threading.Thread(target=register)
    thread.start()
    try:
        fleet.wait_for(lambda: any(fleet.root.glob("before_register_check.*.ready")), what="the file to be hashed")
        if swapped == "before_the_check":
            model.write_bytes(other)
        (fleet.root / "before_register_check.go").touch()
        fleet.wait_for(lambda: not thread.is_alive() or any(fleet.root.glob("before_register_store.*.ready")),
                       what="register to refuse, or to reach before_register_store")
        if thread.is_alive():  # checked: now the bytes it would store are put back as hashed, or rewritten
            model.write_bytes(original if swapped == "before_the_check" else other)
    finally:
        for name in ("before_register_check", "before_register_store"):
            (fleet.root / f"{name}.go").touch()
        thread.join(60)
    assert isinstance(outcome.get("error"), Conflict), outcome
    assert str(outcome["error"]) == f"model file {str(model)!r} changed while it was being registered; register it again"
    assert fleet.client.get_prefix_response(fleet.keys.prefix).kvs == []  # no version, route or history
    for data in (original, other):
        assert not fleet.registry.store.exists(artifact_for(hashlib.sha256(data).hexdigest()))


@pytest.mark.parametrize("tenant", ["", "a/b", "..", ".", "x" * 129, "tenant with space", "t\n"])
def test_invalid_tenant_ids_are_refused(fleet, tenant):
    with pytest.raises(InvalidArgument, match="invalid tenant id"):
        fleet.registry.register(tenant, "v1", fleet.model_file(1))


def test_not_a_model_is_refused_before_anything_is_written(fleet, tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("this is not a model")
    with pytest.raises(FailedPrecondition, match="not a usable LightGBM model"):
        fleet.registry.register("acme", "v1", junk)
    with pytest.raises(NotFound):
        fleet.registry.route("acme")
