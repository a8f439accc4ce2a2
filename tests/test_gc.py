"""`modelfleet gc`: keeps newest K, serving, pinned and rollouts; deletes unshared artifacts; dry run."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.test_cli import cli


def test_gc_keeps_what_matters_and_deletes_only_unshared_artifacts(fleet):
    for n in range(1, 7):
        fleet.register("acme", f"v{n}", seed=n)
    fleet.register("other", "v1", seed=2)  # shares acme v2's artifact
    fleet.registry.pin("acme", "v1")
    fleet.registry.start_rollout("acme", "v3", shadow=True)
    artifacts = {v.version: v.artifact for v in fleet.registry.versions("acme")}

    dry = json.loads(cli(fleet, "gc", "--keep", "2", "--json").stdout)
    assert dry["applied"] is False and dry["removals"] == {"acme": ["v2", "v4"]}
    assert len(fleet.registry.versions("acme")) == 6  # nothing happened

    done = json.loads(cli(fleet, "gc", "--keep", "2", "--yes", "--json").stdout)
    assert done["removed_versions"] == 2 and done["deleted_artifacts"] == 1
    assert [v.version for v in fleet.registry.versions("acme")] == ["v1", "v3", "v5", "v6"]
    assert (fleet.store_dir / artifacts["v2"]).exists()  # still used by tenant other
    assert not (fleet.store_dir / artifacts["v4"]).exists()
    assert fleet.registry.route("acme")[0].serving == "v1"


def test_gc_rejects_a_bad_keep_and_an_unknown_tenant(fleet):
    done = cli(fleet, "gc", "--keep", "0")
    assert done.returncode == 2 and "expected a whole number >= 1, got '0'" in done.stderr
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    fleet.register("other", "v1", seed=3)
    done = cli(fleet, "gc", "--keep", "1", "--tenant", "nosuch")
    assert done.returncode == 1 and done.stderr == "error: unknown tenant 'nosuch': no versions registered\n"
    scoped = json.loads(cli(fleet, "gc", "--keep", "1", "--tenant", "acme", "--json").stdout)
    assert scoped["removals"] == {"acme": ["v1"]} and scoped["kept_versions"] == 1  # acme's, not the fleet's


def test_a_register_racing_gc_of_the_artifact_it_shares_keeps_it_stored(fleet):
    """`register` skips storing a file whose artifact exists; gc deletes an artifact no version
    uses. A registration between the two must not end up serving a deleted artifact."""
    for n in range(1, 4):
        fleet.register("old", f"v{n}", seed=n)  # gc --keep 2 removes v1 and its artifact
    shared = fleet.model_file(1)  # the file of old's v1
    artifact = fleet.registry.version("old", "v1").artifact
    env = dict(fleet.env(), MODELFLEET_FAILPOINT_DIR=str(fleet.root))
    register = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "register", "--tenant", "new",
                                 "--version", "v1", "--model-file", str(shared)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fleet.wait_for(lambda: any(fleet.root.glob("before_register_write.*.ready")),
                   what="the register to have found the artifact stored")
    done = json.loads(cli(fleet, "gc", "--keep", "2", "--tenant", "old", "--yes", "--json").stdout)
    assert done["removed_versions"] == 1 and done["deleted_artifacts"] == 1
    assert not (fleet.store_dir / artifact).exists()
    (fleet.root / "before_register_write.go").touch()
    assert register.wait(60) == 0, register.stderr.read()
    assert fleet.registry.version("new", "v1").artifact == artifact
    assert (fleet.store_dir / artifact).exists()  # stored again before its record was written
