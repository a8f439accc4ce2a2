"""The README's configuration table is the config module written out: no option goes undocumented."""
from __future__ import annotations

from modelfleet import config
from modelfleet.local_fleet import REPO_ROOT


def test_every_option_is_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [o.env for o in config.ALL_OPTIONS if f"`{o.env}`" not in readme]
    assert not missing, f"document these in README.md's configuration table: {missing}"


def test_every_test_the_guarantees_cite_exists():
    """The Guarantees table names its proofs; a renamed or deleted test must not leave it lying."""
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = []  # (file, test or ''): a bare `::test_x` continues the file cited before it in its row
    for row in section.splitlines():
        file_name = ""
        for named_file, test_name in re.findall(r"`(?:tests/)?(test_\w+\.py)?(?:::(test_\w+))?", row):
            file_name = named_file or file_name
            if file_name and (named_file or test_name):
                cited.append((file_name, test_name))
    assert len(cited) >= 15
    missing = []
    for file_name, test_name in cited:
        path = REPO_ROOT / "tests" / file_name
        if not path.is_file() or (test_name and f"def {test_name}(" not in path.read_text()):
            missing.append(f"{file_name}::{test_name}")
    assert not missing, f"README's Guarantees cite tests that do not exist: {missing}"
