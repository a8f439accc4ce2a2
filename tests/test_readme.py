"""The README's configuration table is the config module written out: no option goes undocumented."""
from __future__ import annotations

from modelfleet import config
from modelfleet.local_fleet import REPO_ROOT


def test_every_option_is_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [o.env for o in config.ALL_OPTIONS if f"`{o.env}`" not in readme]
    assert not missing, f"document these in README.md's configuration table: {missing}"
