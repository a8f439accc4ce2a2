"""The synthetic fleet generator: valid, distinct, deterministic models and a correct manifest."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import lightgbm
import numpy as np
import pytest

from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.fleet_gen import (
    Template, artifact_path, generate_fleet, template_recipe, tenant_id, train_templates,
)

TENANTS = 200
VERSIONS = 2
TEMPLATES = 8


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fleet")
    progress: list[tuple[int, int]] = []
    manifest = generate_fleet(out, TENANTS, templates=TEMPLATES, versions=VERSIONS, seed=3,
                              on_progress=lambda done, total: progress.append((done, total)))
    assert manifest == out / "manifest.csv"
    assert progress[0] == (0, TENANTS * VERSIONS)
    assert progress[-1] == (TENANTS * VERSIONS, TENANTS * VERSIONS)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    return out


def _rows(fleet: Path) -> list[dict[str, str]]:
    with open(fleet / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _tree_sizes_match(text: str) -> bool:
    """tree_sizes= must be exact: LightGBM aborts the process (not raises) on a wrong one."""
    line = next(ln for ln in text.splitlines() if ln.startswith("tree_sizes="))
    sizes = [int(s) for s in line.split("=", 1)[1].split()]
    pos = text.index("\nTree=0\n") + 1
    for i, size in enumerate(sizes):
        if not text.startswith(f"Tree={i}\n", pos):
            return False
        pos += size
    return text.startswith("end of trees", pos)


def test_manifest_lists_every_tenant_version(fleet: Path) -> None:
    rows = _rows(fleet)
    assert list(rows[0]) == ["tenant", "version", "artifact"]
    assert len(rows) == TENANTS * VERSIONS
    assert rows[0] == {"tenant": "tenant-000001", "version": "v1", "artifact": artifact_path(1, 1)}
    assert {(r["tenant"], r["version"]) for r in rows} == {
        (tenant_id(n), f"v{v}") for n in range(1, TENANTS + 1) for v in range(1, VERSIONS + 1)}
    for r in rows:
        assert not Path(r["artifact"]).is_absolute()
        assert (fleet / r["artifact"]).is_file()
    assert len(list((fleet / "models").rglob("*.txt"))) == TENANTS * VERSIONS


def test_models_load_and_keep_the_template_shape(fleet: Path) -> None:
    rows = _rows(fleet)
    rng = np.random.default_rng(0)
    x = sample_features(11, 30)
    for i in rng.choice(len(rows), size=50, replace=False):
        text = (fleet / rows[i]["artifact"]).read_text()
        assert _tree_sizes_match(text)
        booster = lightgbm.Booster(model_str=text)
        assert booster.num_feature() == 8
        assert np.all(np.isfinite(booster.predict(x)))


def test_tenants_sharing_a_template_predict_differently(fleet: Path) -> None:
    x = sample_features(12, 50)
    # tenants 1, 9, 17, ... share template 0 (regression); 2, 10, ... template 1 (binary); 3, ... multiclass
    for first in (1, 2, 3):
        preds = []
        for n in range(first, first + 5 * TEMPLATES, TEMPLATES):
            text = (fleet / artifact_path(n, 1)).read_text()
            preds.append(lightgbm.Booster(model_str=text).predict(x))
        for a in range(len(preds)):
            for b in range(a + 1, len(preds)):
                assert not np.allclose(preds[a], preds[b], rtol=0, atol=1e-9)
    v1 = lightgbm.Booster(model_str=(fleet / artifact_path(5, 1)).read_text()).predict(x)
    v2 = lightgbm.Booster(model_str=(fleet / artifact_path(5, 2)).read_text()).predict(x)
    assert not np.allclose(v1, v2, rtol=0, atol=1e-9)


def test_perturbed_model_stays_close_to_its_template() -> None:
    template = train_templates(1, 8, 0)[0]
    template_text = train_model_text(num_features=8, **template_recipe(0, 0))
    x = sample_features(13, 200)
    base = lightgbm.Booster(model_str=template_text).predict(x)
    tenant = lightgbm.Booster(model_str=template.render(0, 1, 1)).predict(x)
    assert np.corrcoef(base, tenant)[0, 1] > 0.9


def test_same_seed_same_bytes_whatever_the_process_count(fleet: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"  # the fixture ran in-process; this one splits the work over 2 processes
    generate_fleet(again, TENANTS, templates=TEMPLATES, versions=VERSIONS, seed=3, processes=2)
    assert (again / "manifest.csv").read_bytes() == (fleet / "manifest.csv").read_bytes()
    for n in range(1, TENANTS + 1):
        for v in (1, 2):
            assert (again / artifact_path(n, v)).read_bytes() == (fleet / artifact_path(n, v)).read_bytes()
    other = tmp_path / "other"
    generate_fleet(other, 3, templates=TEMPLATES, seed=4)
    assert (other / artifact_path(1, 1)).read_bytes() != (fleet / artifact_path(1, 1)).read_bytes()


def test_jsonl_manifest(tmp_path: Path) -> None:
    manifest = generate_fleet(tmp_path, 5, templates=2, versions=2, manifest_format="jsonl")
    assert manifest == tmp_path / "manifest.jsonl"
    docs = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(docs) == 10
    assert docs[0] == {"tenant": "tenant-000001", "version": "v1", "artifact": artifact_path(1, 1)}
    for doc in docs:
        assert lightgbm.Booster(model_file=str(tmp_path / doc["artifact"])).num_feature() == 8


def test_template_parse_rejects_text_without_tree_sizes() -> None:
    with pytest.raises(ValueError):
        Template.parse("tree\nversion=v4\n\nTree=0\nnum_leaves=1\nleaf_value=0\n\nend of trees\n")


@pytest.mark.parametrize("kwargs", [
    {"tenants": 0},
    {"tenants": -5},
    {"tenants": 2.5},
    {"tenants": 3, "manifest_format": "parquet"},
    {"tenants": 3, "versions": 0},
    {"tenants": 3, "templates": 0},
    {"tenants": 3, "num_features": 0},
    {"tenants": 3, "seed": -1},
    {"tenants": 3, "processes": 0},
])
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_fleet(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
