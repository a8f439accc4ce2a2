"""Real, small LightGBM models trained on synthetic data, for demos, tests and benchmarks.

Why train instead of shipping fixture files: a fixture hides which LightGBM version wrote it and
goes stale when the pinned version moves; training from a seed takes a few milliseconds, always
matches the installed LightGBM, and lets every tenant of a demo fleet get a genuinely different
model (different seed -> different data -> different trees).

Training data contains NaNs on purpose, so the trees learn default directions for missing values
and predictions on NaN features exercise the same code paths production models do.
"""
from __future__ import annotations

import lightgbm
import numpy as np

OBJECTIVES = ("regression", "binary", "multiclass")

# Enough rows for 15-leaf trees to split meaningfully, few enough to train in a few milliseconds.
_TRAIN_ROWS = 600
_NAN_FRACTION = 0.05


def sample_features(seed: int, rows: int, num_features: int = 8) -> np.ndarray:
    """Returns a (rows, num_features) float64 array of realistic feature rows, ~5% NaN.

    Features have different scales and shapes (normal, log-normal, small integers) because real
    tenant features do, and because that spreads split thresholds across very different ranges.
    """
    rng = np.random.default_rng(seed)
    columns = []
    for j in range(num_features):
        kind = j % 3
        if kind == 0:
            col = rng.normal(loc=j, scale=1.0 + j, size=rows)
        elif kind == 1:
            col = rng.lognormal(mean=0.0, sigma=1.0, size=rows) * (10.0 ** (j % 4))
        else:
            col = rng.integers(0, 5 + j, size=rows).astype(np.float64)
        columns.append(col)
    x = np.column_stack(columns) if columns else np.empty((rows, 0))
    x[rng.random(x.shape) < _NAN_FRACTION] = np.nan
    return np.ascontiguousarray(x, dtype=np.float64)


def _labels(rng: np.random.Generator, x: np.ndarray, objective: str, num_class: int) -> np.ndarray:
    """A seed-dependent nonlinear target, so different seeds learn different trees."""
    filled = np.nan_to_num(x, nan=0.0)
    weights = rng.normal(size=x.shape[1])
    signal = np.tanh(filled / (1.0 + np.abs(filled).mean(axis=0))) @ weights
    signal += 0.5 * np.isnan(x[:, 0])  # missingness itself carries signal
    signal += rng.normal(scale=0.3, size=len(x))
    if objective == "regression":
        return signal
    if objective == "binary":
        return (signal > np.median(signal)).astype(np.float64)
    # multiclass: quantile buckets give balanced classes
    edges = np.quantile(signal, np.linspace(0, 1, num_class + 1)[1:-1])
    return np.searchsorted(edges, signal).astype(np.float64)


def train_booster(
    seed: int,
    num_features: int = 8,
    objective: str = "regression",
    num_class: int = 3,
    num_trees: int = 20,
    num_leaves: int = 15,
) -> lightgbm.Booster:
    """Trains and returns the booster behind `train_model_text` (same arguments, same model)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    rng = np.random.default_rng([seed, 0x5EED])  # independent of sample_features(seed, ...)
    x = sample_features(int(rng.integers(2**31)), _TRAIN_ROWS, num_features)
    y = _labels(rng, x, objective, num_class)
    params: dict[str, object] = {
        "objective": objective,
        "num_leaves": num_leaves,
        "min_data_in_leaf": 5,
        "learning_rate": 0.1,
        "max_bin": 63,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,  # skips LightGBM's timing of row- vs col-wise (and its warning)
        "num_threads": 1,
        "verbose": -1,
    }
    if objective == "multiclass":
        params["num_class"] = num_class
    dataset = lightgbm.Dataset(x, label=y, params={"verbose": -1, "max_bin": 63})
    return lightgbm.train(params, dataset, num_boost_round=num_trees)


def train_model_text(
    seed: int,
    num_features: int = 8,
    objective: str = "regression",
    num_class: int = 3,
    num_trees: int = 20,
    num_leaves: int = 15,
) -> str:
    """Trains a small real model from `seed` and returns its text (`Booster.model_to_string()`).

    Deterministic: the same arguments give the same text. `num_class` only matters for
    "multiclass" (where the model has num_trees * num_class trees).
    """
    booster = train_booster(seed, num_features, objective, num_class, num_trees, num_leaves)
    return booster.model_to_string()
