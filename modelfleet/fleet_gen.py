"""Synthetic model fleets: many distinct, valid LightGBM models, fast, from a few trained templates.

    generate_fleet(Path("fleet"), tenants=100_000)   # -> fleet/manifest.csv, fleet/models/<hh>/...

Training 100k real models would take far too long, so a handful of templates are trained with
`demo_models.train_model_text` (a mix of regression, binary and multiclass, 20-50 trees each)
and every tenant model is a template whose `leaf_value=` lines were rewritten with
deterministically perturbed values: `v * (1 + 0.05 * N(0,1)) + shift`, where `shift` is one small
per-model constant (1% of the template's mean |leaf value| times N(0,1)). Tree structure, split
thresholds, feature count, objective and parameters stay the template's, so each file is a
genuine LightGBM model (it loads with `lightgbm.Booster(model_str=...)`) and tenants that share
a template still predict differently. Other per-node statistics (internal_value, split_gain,
counts) are kept as trained: prediction uses only leaf values, so they only matter to refit and
are left as realistic as the template's.

Each template's text is parsed once into fixed pieces; a tenant model is one `''.join` of those
pieces and the freshly formatted leaf values (`repr`, i.e. shortest round-trip, so the Booster
holds exactly the float64 computed here). The header's `tree_sizes=` line is recomputed for every
model: LightGBM splits the model string by those sizes, and a wrong size does not raise -- it
aborts the whole process from inside an OpenMP region (verified with lightgbm 4.7.0; a model
without the line loads, but real models have it, so the generator keeps it and keeps it right).

Output layout (artifact paths in the manifest are relative to the manifest's directory, `out_dir`,
with '/' separators):

    out_dir/manifest.csv                          header `tenant,version,artifact`
    out_dir/manifest.jsonl                        or {"tenant":..,"version":..,"artifact":..} lines
    out_dir/models/<hh>/<tenant>-<version>.txt    hh = tenant number % 256 as two hex digits

Tenant ids are `tenant-000001`, `tenant-000002`, ... and versions `v1`, `v2`, ... Output is a
pure function of (tenants, templates, num_features, seed, versions): the same arguments give the
same bytes whatever the number of processes. The manifest is written last and atomically, so a
manifest on disk means every model it lists was written. Files are not fsynced.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_FORMATS = ("csv", "jsonl")
MODELS_DIR = "models"
SHARD_DIRS = 256

_OBJECTIVES = ("regression", "binary", "multiclass")  # same names as demo_models.OBJECTIVES
_NUM_CLASS = 3
_LEAF_NOISE = 0.05  # relative, per leaf
_SHIFT_NOISE = 0.01  # per model, relative to the template's mean |leaf value|
_CHUNK_TENANTS = 250  # tenants per task handed to a worker process
_INLINE_MAX_MODELS = 2_000  # below this, one process is faster than starting a pool

ProgressCallback = Callable[[int, int], None]  # (model files written so far, total model files)


def tenant_id(number: int) -> str:
    """The id of tenant `number` (1-based): tenant-000001, ..., wider past 999999."""
    return f"tenant-{number:06d}"


def version_id(number: int) -> str:
    """The id of version `number` (1-based): v1, v2, ..."""
    return f"v{number}"


def artifact_path(tenant_number: int, version_number: int) -> str:
    """The model's path relative to the fleet directory (the manifest's directory)."""
    return (f"{MODELS_DIR}/{tenant_number % SHARD_DIRS:02x}/"
            f"{tenant_id(tenant_number)}-{version_id(version_number)}.txt")


def template_recipe(index: int, seed: int) -> dict[str, object]:
    """`train_model_text` keyword arguments of template `index` (deterministic in index and seed).

    Objectives rotate regression, binary, multiclass; total trees spread over 20-50 (a multiclass
    model has 3 trees per iteration); small templates get 15 leaves, bigger ones 7, which keeps
    the fleet's mean model near 35 KB so that 100k tenants fit in well under 5 GB.
    """
    objective = _OBJECTIVES[index % len(_OBJECTIVES)]
    total_trees = 20 + (index * 11) % 31
    per_iteration = _NUM_CLASS if objective == "multiclass" else 1
    train_seed = int(np.random.default_rng([seed, 0xF1EE7, index]).integers(2**31))
    return {
        "seed": train_seed,
        "objective": objective,
        "num_trees": max(1, round(total_trees / per_iteration)),
        "num_leaves": 15 if total_trees <= 25 else 7,
    }


@dataclass(frozen=True)
class Template:
    """A model text cut into the pieces a perturbed copy reuses verbatim.

    text == head + "tree_sizes=" + " ".join(sizes) + mid + (pre[i] + leaf_line[i] + post[i] for each tree) + tail
    """

    head: str
    mid: str
    pre: tuple[str, ...]
    post: tuple[str, ...]
    fixed_sizes: tuple[int, ...]  # len(pre[i]) + len(post[i])
    bounds: tuple[int, ...]  # tree i's leaves are leaf_values[bounds[i]:bounds[i + 1]]
    tail: str
    leaf_values: np.ndarray  # float64, all trees' leaves in order
    shift_scale: float
    num_feature: int
    objective: str

    @classmethod
    def parse(cls, text: str) -> Template:
        """Cuts `Booster.model_to_string()` output; ValueError if it is not laid out as expected."""
        key = "\ntree_sizes="
        at = text.find(key)
        if at < 0:
            raise ValueError("model text has no tree_sizes= line")
        head = text[:at + 1]
        line_end = text.index("\n", at + 1)
        sizes = [int(s) for s in text[at + len(key):line_end].split()]
        first = text.find("\nTree=0\n", line_end - 1)
        if first < 0:
            raise ValueError("model text has no Tree=0 block")
        mid = text[line_end:first + 1]
        pos = first + 1
        pre, post, fixed, bounds, values = [], [], [], [0], []
        for i, size in enumerate(sizes):
            block = text[pos:pos + size]
            if not block.startswith(f"Tree={i}\n"):
                raise ValueError(f"tree_sizes do not match the text at tree {i}")
            lv = block.index("\nleaf_value=") + len("\nleaf_value=")
            lv_end = block.index("\n", lv)
            leaves = [float(v) for v in block[lv:lv_end].split()]
            num_leaves = int(block.split("num_leaves=", 1)[1].split("\n", 1)[0])
            if len(leaves) != num_leaves:
                raise ValueError(f"tree {i} has {len(leaves)} leaf values for {num_leaves} leaves")
            pre.append(block[:lv])
            post.append(block[lv_end:])
            fixed.append(lv + len(block) - lv_end)
            values.extend(leaves)
            bounds.append(len(values))
            pos += size
        tail = text[pos:]
        if not tail.startswith("end of trees"):
            raise ValueError("tree_sizes do not add up to the tree section")
        header = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
        leaf_values = np.asarray(values, dtype=np.float64)
        return cls(
            head=head, mid=mid, pre=tuple(pre), post=tuple(post), fixed_sizes=tuple(fixed),
            bounds=tuple(bounds), tail=tail, leaf_values=leaf_values,
            shift_scale=float(np.mean(np.abs(leaf_values))) if len(leaf_values) else 0.0,
            num_feature=int(header["max_feature_idx"]) + 1, objective=header["objective"].split()[0],
        )

    def render(self, seed: int, tenant_number: int, version_number: int) -> str:
        """The model text of one (tenant, version): this template with perturbed leaf values."""
        rng = np.random.default_rng([seed, tenant_number, version_number])
        noise = rng.standard_normal(len(self.leaf_values) + 1)
        shift = _SHIFT_NOISE * self.shift_scale * noise[-1]
        values = self.leaf_values * (1.0 + _LEAF_NOISE * noise[:-1]) + shift
        strs = list(map(repr, values.tolist()))
        bounds = self.bounds
        leaf_lines = [" ".join(strs[bounds[i]:bounds[i + 1]]) for i in range(len(self.pre))]
        sizes = [f + len(line) for f, line in zip(self.fixed_sizes, leaf_lines)]
        parts = [self.head, "tree_sizes=", " ".join(map(str, sizes)), self.mid]
        for p, line, q in zip(self.pre, leaf_lines, self.post):
            parts += (p, line, q)
        parts.append(self.tail)
        return "".join(parts)


def train_templates(templates: int, num_features: int, seed: int) -> list[Template]:
    """Trains and parses the templates (a few ms each)."""
    from modelfleet.demo_models import train_model_text  # lazy: worker processes never import lightgbm

    return [Template.parse(train_model_text(num_features=num_features, **template_recipe(k, seed)))
            for k in range(templates)]


# -- worker side ---------------------------------------------------------------------------------
_worker_state: tuple[list[Template], Path, int, int] | None = None


def _init_worker(templates: list[Template], out_dir: str, seed: int, versions: int) -> None:
    global _worker_state
    _worker_state = (templates, Path(out_dir), seed, versions)


def _reset_worker() -> None:
    global _worker_state
    _worker_state = None


def _write_chunk(span: tuple[int, int]) -> int:
    """Writes every version of tenants span[0]..span[1]-1 (1-based numbers); returns files written."""
    assert _worker_state is not None
    templates, out_dir, seed, versions = _worker_state
    written = 0
    for n in range(span[0], span[1]):
        template = templates[(n - 1) % len(templates)]
        for v in range(1, versions + 1):
            data = template.render(seed, n, v).encode("ascii")
            with open(out_dir / artifact_path(n, v), "wb") as fh:
                fh.write(data)
            written += 1
    return written


# -- driver --------------------------------------------------------------------------------------
def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _write_manifest(out_dir: Path, tenants: int, versions: int, manifest_format: str) -> Path:
    path = out_dir / f"manifest.{manifest_format}"
    tmp = out_dir / f".manifest.{manifest_format}.tmp"
    with open(tmp, "w", encoding="ascii", newline="") as fh:
        if manifest_format == "csv":
            fh.write("tenant,version,artifact\n")
            for n in range(1, tenants + 1):
                t = tenant_id(n)
                for v in range(1, versions + 1):
                    fh.write(f"{t},{version_id(v)},{artifact_path(n, v)}\n")
        else:
            for n in range(1, tenants + 1):
                t = tenant_id(n)
                for v in range(1, versions + 1):
                    fh.write(json.dumps({"tenant": t, "version": version_id(v), "artifact": artifact_path(n, v)},
                                        separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def generate_fleet(
    out_dir: Path,
    tenants: int,
    templates: int = 8,
    num_features: int = 8,
    seed: int = 0,
    versions: int = 1,
    manifest_format: str = "csv",
    on_progress: ProgressCallback | None = None,
    *,
    processes: int | None = None,
) -> Path:
    """Writes `tenants` x `versions` distinct LightGBM models and a manifest; returns the manifest path.

    out_dir is created if missing; files already there with the same names are overwritten (so a
    rerun with the same arguments is idempotent), others are left alone. `on_progress(done, total)`
    is called from this thread with model files written so far and `tenants * versions`: once
    with done=0 after the templates are trained, then after every chunk of tenants, last with
    done == total (before the manifest is written). `processes` defaults to os.cpu_count()
    (small fleets run in this process). ValueError on bad arguments.
    """
    _check_int("tenants", tenants, 1)
    _check_int("templates", templates, 1)
    _check_int("num_features", num_features, 1)
    _check_int("seed", seed, 0)
    _check_int("versions", versions, 1)
    if manifest_format not in MANIFEST_FORMATS:
        raise ValueError(f"manifest_format must be one of {MANIFEST_FORMATS}, got {manifest_format!r}")
    if processes is not None:
        _check_int("processes", processes, 1)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    parsed = train_templates(min(templates, tenants), num_features, seed)
    for shard in range(min(SHARD_DIRS, tenants + 1)):
        (out_dir / MODELS_DIR / f"{shard:02x}").mkdir(parents=True, exist_ok=True)

    total = tenants * versions
    if on_progress is not None:
        on_progress(0, total)
    chunk = max(1, _CHUNK_TENANTS // versions)
    spans = [(lo, min(lo + chunk, tenants + 1)) for lo in range(1, tenants + 1, chunk)]
    workers = processes if processes is not None else (os.cpu_count() or 1)
    workers = min(workers, len(spans))
    if total <= _INLINE_MAX_MODELS and processes is None:
        workers = 1
    done = 0
    init_args = (parsed, str(out_dir), seed, versions)
    if workers <= 1:
        _init_worker(*init_args)
        try:
            for span in spans:
                done += _write_chunk(span)
                if on_progress is not None:
                    on_progress(done, total)
        finally:
            _reset_worker()
    else:
        # spawn, not fork: the parent has just run LightGBM (OpenMP threads) and may be a CLI
        # with other threads; workers only need numpy and the parsed templates.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
            for n in pool.imap_unordered(_write_chunk, spans):
                done += n
                if on_progress is not None:
                    on_progress(done, total)
    return _write_manifest(out_dir, tenants, versions, manifest_format)


def expected_bytes_per_model(templates: int = 8, num_features: int = 8, seed: int = 0) -> float:
    """Mean size of a generated model over the templates (renders one model per template)."""
    parsed = train_templates(templates, num_features, seed)
    return math.fsum(len(t.render(seed, k + 1, 1)) for k, t in enumerate(parsed)) / len(parsed)
