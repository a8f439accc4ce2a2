"""`modelfleet gc`: keeps newest K, serving, pinned and rollouts; deletes unshared artifacts; dry run."""
from __future__ import annotations

import json

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
