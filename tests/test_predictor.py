"""LoadedModel against lightgbm.Booster.predict on real trained models, plus its lifetime rules.

Predictions must be bit-identical to Booster.predict: both paths end in the same LightGBM tree
walk, so any difference means a wrong argument (iterations, predict type, layout).
"""
from __future__ import annotations

import gc
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import lightgbm
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from modelfleet import demo_models
from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.errors import FailedPrecondition, InvalidArgument
from modelfleet.procfs import rss_bytes
from modelfleet.v1 import predictor_pb2
from worker import predictor
from worker.predictor import LoadedModel

NUM_FEATURES = 8
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=demo_models.OBJECTIVES)
def trained(request) -> tuple[str, str]:
    """(objective, model text) for each objective, trained once per module."""
    return request.param, train_model_text(seed=11, num_features=NUM_FEATURES, objective=request.param)


# Single rows go through C (worker/_row_predict.c) where it was built, through ctypes otherwise:
# every value and bad-input test runs on both.
ROW_PATHS = ["c", "ctypes"] if predictor.RowPredictor is not None else ["ctypes"]


@pytest.fixture(params=ROW_PATHS)
def model(trained, request):
    loaded = LoadedModel.from_model_text(trained[1], row_predict=request.param)
    yield loaded
    loaded.close()


def rows_with_edge_values(rows: int = 100) -> np.ndarray:
    """Realistic rows (some NaN) plus rows of all NaN, +inf, -inf and mixed non-finite values."""
    x = sample_features(seed=5, rows=rows, num_features=NUM_FEATURES)
    x[0, :] = np.nan
    x[1, :] = np.inf
    x[2, :] = -np.inf
    x[3, ::2] = np.inf
    x[3, 1::2] = np.nan
    return x


def reference(text: str, x: np.ndarray) -> np.ndarray:
    """Booster.predict, flattened row-major like LoadedModel.predict."""
    return np.asarray(lightgbm.Booster(model_str=text).predict(x), dtype=np.float64).reshape(-1)


def count_frees(monkeypatch) -> list[tuple[int, int]]:
    """Records every native free of models loaded after this call (and still frees them)."""
    calls: list[tuple[int, int]] = []
    real_free = predictor._free_native

    def recording_free(fast_config: int, booster: int, row_predictor=None) -> None:
        calls.append((fast_config, booster))
        real_free(fast_config, booster, row_predictor)

    monkeypatch.setattr(predictor, "_free_native", recording_free)
    return calls


# --- values ------------------------------------------------------------------------------------

def test_shape_matches_the_model(trained, model):
    objective, _ = trained
    assert model.num_features == NUM_FEATURES
    assert model.num_classes == (3 if objective == "multiclass" else 1)


def test_single_rows_match_booster_predict_exactly(trained, model):
    x = rows_with_edge_values()
    expected = reference(trained[1], x).reshape(len(x), model.num_classes)
    for row, want in zip(x, expected):
        np.testing.assert_array_equal(model.predict(row), want)
        np.testing.assert_array_equal(model.predict(row.tolist()), want)
    if trained[0] != "regression":  # probabilities, not raw scores
        assert ((expected >= 0) & (expected <= 1)).all()


def test_single_row_from_protobuf_and_odd_arrays(trained, model):
    x = rows_with_edge_values(10)
    expected = reference(trained[1], x[4:5])
    request = predictor_pb2.PredictRequest(features=x[4].tolist())
    np.testing.assert_array_equal(model.predict(request.features), expected)
    np.testing.assert_array_equal(model.predict(x[4:5]), expected)  # 2-D, one row
    np.testing.assert_array_equal(model.predict(np.asfortranarray(x)[4]), expected)  # strided view
    np.testing.assert_array_equal(model.predict(x[4].astype(">f8")), expected)  # big-endian


@pytest.mark.parametrize("rows", [2, 3, 100])
def test_batches_match_booster_predict_exactly(trained, model, rows):
    x = rows_with_edge_values()[:rows]
    expected = reference(trained[1], x)
    np.testing.assert_array_equal(model.predict(x.reshape(-1)), expected)
    np.testing.assert_array_equal(model.predict(x), expected)
    np.testing.assert_array_equal(model.predict(x.reshape(-1).tolist()), expected)
    request = predictor_pb2.PredictRequest(features=x.reshape(-1).tolist())
    np.testing.assert_array_equal(model.predict(request.features), expected)


def test_returned_values_are_independent_lists(model):
    x = sample_features(seed=1, rows=2, num_features=NUM_FEATURES)
    first = model.predict(x[0])
    assert type(first) is list and all(type(v) is float for v in first)  # what a response carries
    kept = list(first)
    model.predict(x[1])
    assert first == kept  # not a view of a reused buffer


def test_8_threads_predicting_on_one_model_get_the_reference_values(trained, model):
    x = rows_with_edge_values(64)
    expected = reference(trained[1], x).reshape(len(x), model.num_classes)
    start = threading.Barrier(8)
    failures: list[str] = []

    def hammer(thread: int) -> None:
        start.wait()
        for i in range(300):
            r = (i * 7 + thread) % len(x)
            if i % 25 == 0:  # batches interleaved with single rows
                got = np.reshape(model.predict(x[r:r + 5].reshape(-1)), (-1, model.num_classes))
                if not np.array_equal(got, expected[r:r + 5]):
                    failures.append(f"thread {thread} batch at row {r}")
            elif not np.array_equal(model.predict(x[r]), expected[r]):
                failures.append(f"thread {thread} row {r}")

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_row_predicted_while_another_thread_holds_the_row_buffers_is_right(trained):
    """The ctypes path's buffers belong to whoever holds the token; without it, a call must still
    give the reference values (with buffers of its own) and leave the token alone."""
    model = LoadedModel.from_model_text(trained[1], row_predict="ctypes")
    x = rows_with_edge_values(8)
    expected = reference(trained[1], x).reshape(len(x), model.num_classes)
    model._idle.pop()  # as if another thread were between its copy in and its copy out
    try:
        for row, want in zip(x, expected):
            np.testing.assert_array_equal(model.predict(row), want)
            np.testing.assert_array_equal(model.predict(row.tolist()), want)
        assert model._idle == []
    finally:
        model._idle.append(True)
    np.testing.assert_array_equal(model.predict(x[0]), expected[0])
    model.close()


def test_close_waits_for_a_single_row_call_in_flight_then_keeps_the_token(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    loaded = LoadedModel.from_model_text(trained[1], row_predict="ctypes")
    loaded._idle.pop()  # a single-row call in flight in another thread
    closer = threading.Thread(target=loaded.close)
    closer.start()
    closer.join(0.05)
    assert closer.is_alive() and frees == []  # not freed under a call in flight
    loaded._idle.append(True)  # the call ends
    closer.join(5)
    assert not closer.is_alive() and len(frees) == 1
    assert loaded._idle == []  # every later call takes the checked path
    with pytest.raises(FailedPrecondition, match="closed"):
        loaded.predict(np.zeros(NUM_FEATURES))


# --- the C single-row path ------------------------------------------------------------------------

needs_c_path = pytest.mark.skipif(predictor.RowPredictor is None, reason="worker/_row_predict.c was not built")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_c_row_path_is_built_and_the_default_where_a_compiler_is():
    assert predictor.RowPredictor is not None, "pip install did not build worker/_row_predict.c"
    assert predictor.ROW_PREDICT == "c"
    model = LoadedModel.from_model_text(train_model_text(seed=1, num_features=NUM_FEATURES))
    assert model._row_predictor is not None
    model.close()


class ForeignRow:
    """A sequence type of the caller's own: converting it runs Python code, in which another
    thread (here: `during`, run as item 3 is read) can get in."""

    def __init__(self, values: list[float], during) -> None:
        self.values, self.during = values, during

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> float:
        if i == 3:
            self.during()
        return self.values[i]


@needs_c_path
def test_numbers_of_other_exact_types_take_the_c_path_with_the_same_values(trained):
    model = LoadedModel.from_model_text(trained[1], row_predict="c")
    x = rows_with_edge_values(6)
    x[5] = np.arange(NUM_FEATURES) * 3.0 - 5  # whole numbers, given as ints below
    expected = reference(trained[1], x).reshape(len(x), model.num_classes)
    for row, want in zip(x[4:], expected[4:]):
        for given in (tuple(row.tolist()), [np.float64(v) for v in row], ForeignRow(row.tolist(), lambda: None)):
            assert model._row_predictor(given) == want.tolist()
    ints = [int(v) for v in x[5]]
    assert model._row_predictor(ints) == expected[5].tolist()
    for not_taken in ([True] * NUM_FEATURES, x[5].astype(np.float32), x[5][::2], x[4:6], "abcdefgh", None):
        assert model._row_predictor(not_taken) is None  # the validating path decides
    assert model.predict([True] * NUM_FEATURES) == model.predict([1.0] * NUM_FEATURES)
    model.close()


@needs_c_path
def test_a_call_that_gets_in_while_a_foreign_row_converts_predicts_with_its_own_buffers(trained):
    model = LoadedModel.from_model_text(trained[1], row_predict="c")
    x = rows_with_edge_values(8)
    expected = reference(trained[1], x).reshape(len(x), model.num_classes)
    inner: list[list[float]] = []
    outer = model.predict(ForeignRow(x[6].tolist(), lambda: inner.append(model.predict(x[7]))))
    assert outer == expected[6].tolist() and inner == [expected[7].tolist()]
    assert model.predict(x[5]) == expected[5].tolist()  # and the C path is free again
    model.close()


@needs_c_path
def test_a_close_while_a_foreign_row_converts_is_seen_before_the_call(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    model = LoadedModel.from_model_text(trained[1], row_predict="c")
    with pytest.raises(FailedPrecondition, match="closed"):
        model.predict(ForeignRow([0.5] * NUM_FEATURES, model.close))
    assert len(frees) == 1 and model._row_predictor.closed
    with pytest.raises(FailedPrecondition, match="closed"):
        model.predict(np.zeros(NUM_FEATURES))


def outcome(model: LoadedModel, features) -> tuple[str, object]:
    try:
        return "values", model.predict(features)
    except InvalidArgument as exc:
        return "invalid", str(exc)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**1100, 2**1100), st.booleans(),
                    st.floats(width=32).map(np.float32), st.floats().map(np.float64))
anything = st.one_of(numbers, st.text(max_size=3), st.none(), st.lists(numbers, max_size=2))
arrays = st.builds(lambda values, dtype, shape: np.asarray(values, dtype=dtype).reshape(shape),
                   st.lists(st.floats(-1e6, 1e6), min_size=8, max_size=8),
                   st.sampled_from([np.float64, np.float32, ">f8", np.int64]), st.sampled_from([(8,), (1, 8), (2, 4)]))
inputs = st.one_of(st.lists(numbers, min_size=7, max_size=9), st.lists(anything, min_size=8, max_size=8),
                   st.lists(numbers, min_size=8, max_size=8).map(tuple), arrays, st.lists(numbers, max_size=17))


@needs_c_path
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(features=inputs)
def test_c_and_ctypes_paths_answer_every_input_alike(two_paths, features):
    """Whatever a caller passes: the same values, or the same InvalidArgument, on both paths."""
    on_c, on_ctypes = two_paths
    got = outcome(on_c, features)
    assert got == outcome(on_ctypes, features)
    if got[0] == "values":
        assert all(type(v) is float for v in got[1])


@pytest.fixture(scope="module")
def two_paths():
    text = train_model_text(seed=3, num_features=NUM_FEATURES, objective="binary")
    models = LoadedModel.from_model_text(text, row_predict="c"), LoadedModel.from_model_text(text, row_predict="ctypes")
    yield models
    for model in models:
        model.close()


@needs_c_path
def test_a_row_predictor_kept_beyond_its_model_never_calls_the_freed_config(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    model = LoadedModel.from_model_text(trained[1], row_predict="c")
    kept = model._row_predictor
    assert kept(np.zeros(NUM_FEATURES)) is not None
    del model
    gc.collect()
    assert len(frees) == 1 and kept.closed and kept(np.zeros(NUM_FEATURES)) is None


def test_a_model_that_fails_to_construct_frees_the_handles_it_was_given(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    booster = predictor._load_booster(trained[1].encode())
    fast_config = predictor._init_fast_config(booster, NUM_FEATURES)
    with pytest.raises(ValueError, match="row_predict must be"):
        LoadedModel(booster, fast_config, NUM_FEATURES, 1, nbytes=1, row_predict="fortran")
    assert frees == [(fast_config, booster)]


@needs_c_path
def test_the_benchmarks_c_loop_times_calls_on_an_open_predictor_only(trained):
    model = LoadedModel.from_model_text(trained[1], row_predict="c")
    model.predict(np.zeros(NUM_FEATURES))
    assert 0 < model._row_predictor.time_calls(1000) < 1.0
    with pytest.raises(ValueError, match="at least one call"):
        model._row_predictor.time_calls(0)
    model.close()
    with pytest.raises(ValueError, match="open predictor"):
        model._row_predictor.time_calls(10)


@needs_c_path
def test_the_c_path_is_refused_where_it_was_not_built(trained, monkeypatch):
    monkeypatch.setattr(predictor, "RowPredictor", None)
    with pytest.raises(ValueError, match="not built"):
        LoadedModel.from_model_text(trained[1], row_predict="c")


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("empty", [[], np.array([]), np.empty((0, NUM_FEATURES))])
def test_empty_features_are_invalid(model, empty):
    with pytest.raises(InvalidArgument, match=r"^empty features: expected a multiple of 8 features"):
        model.predict(empty)


@pytest.mark.parametrize("length", [1, 5, 7, 9, 17])
def test_a_length_that_is_not_whole_rows_is_invalid(model, length):
    expected = rf"expected a multiple of 8 features \(8 per row\), got {length}$"
    with pytest.raises(InvalidArgument, match=expected):
        model.predict([0.5] * length)
    with pytest.raises(InvalidArgument, match=expected):
        model.predict(np.zeros(length))


@pytest.mark.parametrize("length", [8, 16])
def test_non_numbers_are_invalid(model, length):
    with pytest.raises(InvalidArgument, match="must be numbers"):
        model.predict(["x"] * length)
    with pytest.raises(InvalidArgument, match="must be numbers"):
        model.predict(np.array(["x"] * length))
    with pytest.raises(InvalidArgument, match="sequence of numbers"):
        model.predict(42)


def test_bad_input_leaves_the_model_usable(trained, model):
    x = sample_features(seed=2, rows=1, num_features=NUM_FEATURES)
    with pytest.raises(InvalidArgument):
        model.predict(["x"] * NUM_FEATURES)
    np.testing.assert_array_equal(model.predict(x[0]), reference(trained[1], x))


# --- loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "garbage", "tree\nversion=v4\n", "num_class=1\n\x00"])
def test_garbage_model_text_is_a_failed_precondition(text):
    with pytest.raises(FailedPrecondition, match="cannot load LightGBM model"):
        LoadedModel.from_model_text(text)


def test_artifact_bytes_load_like_the_text_and_must_be_utf8():
    text = train_model_text(seed=3, num_trees=5).replace("Column_1 ", "Température ")
    row = np.arange(NUM_FEATURES, dtype=np.float64)
    from_text, from_bytes = LoadedModel.from_model_text(text), LoadedModel.from_model_text(text.encode())
    try:
        assert from_bytes.predict(row) == from_text.predict(row)
    finally:
        from_text.close()
        from_bytes.close()
    with pytest.raises(FailedPrecondition, match="model text is not UTF-8"):
        LoadedModel.from_model_text(text.encode("latin-1"))
    with pytest.raises(FailedPrecondition, match="contains a NUL byte"):
        LoadedModel.from_model_text(text.encode() + b"\x00")


@pytest.mark.parametrize("shape", [dict(num_trees=1, num_leaves=2), dict(num_trees=40, num_leaves=7),
                                   dict(num_trees=30, num_leaves=15, objective="multiclass")])
def test_leaves_are_counted_from_the_tree_index_as_a_scan_counts_them(shape):
    data = train_model_text(seed=5, **shape).encode()
    scanned = sum(int(n) for n in re.findall(rb"\nnum_leaves=(\d+)", data))
    assert predictor._parseable_bytes(data).leaves == scanned
    no_index = re.sub(rb"\ntree_sizes=[^\n]*", b"", data)
    assert predictor._parseable_bytes(no_index).leaves == scanned
    bad_index = re.sub(rb"\ntree_sizes=(\d+)", lambda m: b"\ntree_sizes=" + str(int(m[1]) - 1).encode(), data)
    assert predictor._parseable_bytes(bad_index).leaves == scanned  # headers not where it says: scanned


TRAINING_ONLY_KEYS = (b"split_gain=", b"leaf_weight=", b"leaf_count=", b"internal_value=", b"internal_weight=",
                      b"internal_count=", b"tree_sizes=")


def categorical_and_linear_models() -> list[tuple[str, str]]:
    """Model texts whose trees carry lines the demo objectives never write: categorical splits
    (cat_boundaries, cat_threshold) and linear leaves (leaf_const, leaf_features, leaf_coeff)."""
    rng = np.random.default_rng(9)
    x = sample_features(seed=9, rows=2000, num_features=NUM_FEATURES)
    x[:, 0] = rng.integers(0, 12, len(x))  # a categorical column
    y = np.where(x[:, 0] % 3 == 0, 2.0, -1.0) + np.nan_to_num(x[:, 1]) * 0.5 + rng.normal(0, 0.1, len(x))
    texts = []
    for name, params, categorical in (("categorical", {}, [0]), ("linear", {"linear_tree": True}, "auto")):
        data = lightgbm.Dataset(x, y, categorical_feature=categorical, free_raw_data=False)
        booster = lightgbm.train({"objective": "regression", "num_leaves": 15, "verbose": -1, "seed": 9,
                                  "min_data_per_group": 5, "cat_smooth": 1, **params}, data, num_boost_round=15)
        texts.append((name, booster.model_to_string()))
    return texts


def test_training_only_lines_are_cut_and_values_stay_identical():
    x = rows_with_edge_values()
    x[4:, 0] = np.arange(len(x) - 4) % 14  # categories seen in training and two that were not
    texts = [(objective, train_model_text(seed=11, num_features=NUM_FEATURES, objective=objective))
             for objective in demo_models.OBJECTIVES] + categorical_and_linear_models()
    for name, text in texts:
        data = text.encode()
        kept = predictor._parseable_bytes(data).data
        cut = sum(len(line) + 1 for line in data.split(b"\n") if line.startswith(TRAINING_ONLY_KEYS))
        assert len(kept) == len(data) - cut + len(predictor._SENTINEL), name  # those lines, nothing else
        for key in TRAINING_ONLY_KEYS:
            assert b"\n" + key in data and b"\n" + key not in kept, (name, key)
        for key in (b"\nsplit_feature=", b"\nthreshold=", b"\nleaf_value=", b"\ndecision_type=", b"\nshrinkage="):
            assert kept.count(key) == data.count(key), (name, key)
        assert (b"\ncat_threshold=" in kept) == (name == "categorical")
        assert (b"\nleaf_coeff=" in kept) == (name == "linear")
        model = LoadedModel.from_model_text(data)
        try:
            expected = reference(text, x)
            np.testing.assert_array_equal(model.predict(x), expected, err_msg=name)
            width = model.num_classes
            for i in range(0, len(x), 7):
                np.testing.assert_array_equal(model.predict(x[i]), expected[i * width:(i + 1) * width], err_msg=name)
        finally:
            model.close()


def test_training_only_lines_laid_out_otherwise_are_kept():
    text = train_model_text(seed=3, num_trees=5)
    moved = re.sub(r"\n(leaf_count=[^\n]*)\n(internal_value=[^\n]*)", r"\n\2\n\1", text)  # not LightGBM's order
    assert moved != text
    kept = predictor._parseable_bytes(moved).data
    assert kept.count(b"\nleaf_count=") == 5 and kept.count(b"\nsplit_gain=") == 0
    x = rows_with_edge_values(20)
    model = LoadedModel.from_model_text(moved)
    try:
        np.testing.assert_array_equal(model.predict(x), reference(text, x))
    finally:
        model.close()


needs_c_cut = pytest.mark.skipif(predictor.cut_training_lines is None, reason="worker/_model_text.c was not built")
LINE_STARTS = [key.decode() for key in TRAINING_ONLY_KEYS] + [
    "tree_sizes=", "leaf_value=", "Tree=", "num_leaves=", "split_gain", "internal_count", "leaf_", ""]


LEAF_RUN = ["leaf_weight=", "leaf_count=", "internal_value=", "internal_weight=", "internal_count="]


def regex_cut(data: bytes, tail: bytes) -> bytes:
    return predictor._TRAINING_ONLY_LINES.sub(b"", data) + tail


@needs_c_cut
def test_the_c_line_cut_is_the_regex_substitution_on_real_models():
    texts = [train_model_text(seed=11, num_features=NUM_FEATURES, objective=objective)
             for objective in demo_models.OBJECTIVES] + [text for _, text in categorical_and_linear_models()]
    for text in texts:
        data = text.encode()
        for variant in (data, data.replace(b"\n", b"\r\n"), data[:len(data) // 3], b"\n" + data, data.rstrip(b"\n")):
            assert predictor.cut_training_lines(variant, predictor._SENTINEL) == regex_cut(variant, predictor._SENTINEL)


@needs_c_cut
@settings(max_examples=400, deadline=None)
@given(units=st.lists(st.one_of(st.sampled_from(LINE_STARTS).map(lambda start: [start]), st.just(LEAF_RUN),
                                 st.integers(1, 4).map(lambda n: LEAF_RUN[:n])), max_size=10),
       rest=st.text("0123456789 .=-e\r", max_size=5), first=st.booleans(), last=st.booleans(),
       tail=st.binary(max_size=4))
def test_the_c_line_cut_is_the_regex_substitution_on_any_lines(units, rest, first, last, tail):
    """Runs whole and broken, lines at the very start and end, empty lines, CRs: the same bytes."""
    lines = [start + rest for unit in units for start in unit]
    data = (("\n" if first else "") + "\n".join(lines) + ("\n" if last else "")).encode()
    assert predictor.cut_training_lines(data, tail) == regex_cut(data, tail)


def test_truncated_model_text_is_a_failed_precondition():
    text = train_model_text(seed=3, num_trees=5)
    trees_end = text.index("end of trees")
    for cut in [text.index("Tree=0") + 9, text.index("Tree=3"), text.index("Tree=3") + 40, trees_end - 3]:
        with pytest.raises(FailedPrecondition, match="cannot load LightGBM model: the text is truncated"):
            LoadedModel.from_model_text(text[:cut])
    LoadedModel.from_model_text(text[:trees_end]).close()  # every tree is there


def test_a_damaged_tree_header_is_a_failed_precondition():
    text = train_model_text(seed=3, num_trees=5).replace("Tree=2", "Tree 2")
    with pytest.raises(FailedPrecondition, match="declares 5 trees but LightGBM read 2"):
        LoadedModel.from_model_text(text)


def test_no_truncation_or_corruption_crashes_the_process():
    """LightGBM itself aborts or reads out of bounds on these; LoadedModel must refuse cleanly.

    In a child process, so that a crash fails this test instead of killing the test run.
    """
    script = """
import random
from modelfleet.demo_models import train_model_text
from modelfleet.errors import FailedPrecondition
from worker.predictor import LoadedModel
text = train_model_text(seed=4, num_trees=3)
rng = random.Random(0)
texts = [text[:cut] for cut in range(0, len(text), 3)]
for _ in range(1000):  # in-bounds damage to the trees: 1-3 bytes changed, deleted or inserted
    chars = list(text)
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(text.index("Tree=0"), text.index("end of trees"))
        op = rng.randrange(3)
        if op == 0: chars[pos] = rng.choice("=\\n -.0xT_")
        elif op == 1: del chars[pos]
        else: chars.insert(pos, rng.choice("=\\n -.0xT_"))
    texts.append("".join(chars))
loaded = refused = 0
for i, t in enumerate(texts):
    try:
        LoadedModel.from_model_text(t.encode() if i % 2 else t).close()  # text, and bytes as a worker reads them
        loaded += 1
    except FailedPrecondition:
        refused += 1
print("loaded", loaded, "refused", refused)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused" in result.stdout


# --- lifetime ----------------------------------------------------------------------------------

def test_close_is_idempotent_and_frees_once(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    loaded = LoadedModel.from_model_text(trained[1])
    loaded.close()
    loaded.close()
    assert len(frees) == 1
    with pytest.raises(FailedPrecondition, match="closed"):
        loaded.predict(np.zeros(NUM_FEATURES))
    with pytest.raises(FailedPrecondition, match="closed"):
        loaded.predict(np.zeros(3 * NUM_FEATURES))
    with pytest.raises(FailedPrecondition, match="closed"):
        with loaded.borrow():
            pass
    del loaded
    gc.collect()
    assert len(frees) == 1


def test_racing_closes_free_once(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    models = [LoadedModel.from_model_text(trained[1]) for _ in range(20)]
    start = threading.Barrier(8)

    def close_all() -> None:
        start.wait()
        for m in models:
            m.close()

    threads = [threading.Thread(target=close_all) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(frees) == 20 and len(set(frees)) == 20


def test_borrow_defers_the_free_until_the_last_borrower_leaves(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    loaded = LoadedModel.from_model_text(trained[1])
    x = sample_features(seed=6, rows=3, num_features=NUM_FEATURES)
    expected = reference(trained[1], x)
    per_row = loaded.num_classes
    with loaded.borrow() as outer:
        assert outer is loaded
        with loaded.borrow():
            loaded.close()
            assert frees == []
            np.testing.assert_array_equal(loaded.predict(x[0]), expected[:per_row])
            with pytest.raises(FailedPrecondition, match="closed"):  # no new borrowers once closing
                with loaded.borrow():
                    pass
        assert frees == []
        np.testing.assert_array_equal(loaded.predict(x.reshape(-1)), expected)
    assert len(frees) == 1
    with pytest.raises(FailedPrecondition, match="closed"):
        loaded.predict(x[0])


def test_a_dropped_model_is_freed_without_close(trained, monkeypatch):
    frees = count_frees(monkeypatch)
    LoadedModel.from_model_text(trained[1]).predict(np.zeros(NUM_FEATURES))
    gc.collect()
    assert len(frees) == 1


# --- memory ------------------------------------------------------------------------------------

def test_nbytes_is_measured_and_grows_with_the_model():
    small = LoadedModel.from_model_text(train_model_text(seed=1, num_trees=10))
    large = LoadedModel.from_model_text(train_model_text(seed=1, num_trees=200))
    try:
        assert 0 < small.nbytes < large.nbytes
        assert large.nbytes > 10 * small.nbytes  # 20x the trees; the fixed part is small
    finally:
        small.close()
        large.close()


@dataclass
class CountedSizing(predictor.Sizing):
    reads: int = 0  # mallinfo2 reads: two per measured load, none for an estimated one


@pytest.fixture
def fresh_sizing(monkeypatch) -> CountedSizing:
    """A sizing state of its own (no calibration from earlier tests) that counts mallinfo2 reads."""
    fresh = CountedSizing()
    monkeypatch.setattr(predictor, "sizing", fresh)
    monkeypatch.setattr(predictor, "_loads_started", 0)  # the every-Nth sample counts from here
    real = predictor._heap_bytes_in_use

    def counting() -> int:
        fresh.reads += 1
        return real()

    monkeypatch.setattr(predictor, "_heap_bytes_in_use", counting)
    return fresh


@pytest.mark.skipif(predictor._mallinfo2 is None, reason="needs glibc mallinfo2")
def test_only_a_sample_of_loads_is_measured(fresh_sizing, monkeypatch):
    monkeypatch.setattr(predictor, "_MEASURE_FIRST", 5)
    monkeypatch.setattr(predictor, "_MEASURE_EVERY", 10)
    monkeypatch.setattr(predictor, "_MEASURE_TIME_SHARE", 1.0)  # the count decides, not the time budget
    text = train_model_text(seed=8, num_trees=5)
    for _ in range(200):  # one at a time: every load runs alone, so every sampled one is measured
        LoadedModel.from_model_text(text).close()
    assert fresh_sizing.measured + fresh_sizing.estimated == 200
    assert 5 + 19 <= fresh_sizing.measured <= 5 + 20  # the first 5, then 1 in 10
    assert fresh_sizing.reads == 2 * fresh_sizing.measured  # estimated loads never call mallinfo2
    assert 0.5 < fresh_sizing.calibration < 2


@pytest.mark.skipif(predictor._mallinfo2 is None, reason="needs glibc mallinfo2")
def test_mallinfo2_reads_keep_to_their_share_of_the_time(fresh_sizing, monkeypatch):
    monkeypatch.setattr(predictor, "_MEASURE_FIRST", 1)
    monkeypatch.setattr(predictor, "_MEASURE_EVERY", 1)  # every load is due for a sample...
    monkeypatch.setattr(predictor, "_MEASURE_TIME_SHARE", 1e-9)  # ...but the first reads' cost defers the next for hours
    text = train_model_text(seed=8, num_trees=5)
    for _ in range(50):
        LoadedModel.from_model_text(text).close()
    assert fresh_sizing.measured == 1 and fresh_sizing.estimated == 49
    assert fresh_sizing.reads == 2 and fresh_sizing.read_seconds > 0


@pytest.mark.skipif(predictor._mallinfo2 is None, reason="needs glibc mallinfo2")
def test_readings_inflated_by_other_allocations_skew_neither_calibration_nor_sizes(fresh_sizing, monkeypatch):
    monkeypatch.setattr(predictor, "_MEASURE_FIRST", 10**9)  # measure every load
    text = train_model_text(seed=3, num_trees=50, num_leaves=31)
    clean = [LoadedModel.from_model_text(text) for _ in range(5)]
    clean_calibration, clean_nbytes = fresh_sizing.calibration, clean[-1].nbytes
    reading = predictor._heap_bytes_in_use
    reads = itertools.count()

    def another_thread_allocates_meanwhile() -> int:  # every 4th load's second reading: +2 MB not its own
        return reading() + (2 << 20 if next(reads) % 8 == 1 else 0)

    monkeypatch.setattr(predictor, "_heap_bytes_in_use", another_thread_allocates_meanwhile)
    models = [LoadedModel.from_model_text(text) for _ in range(24)]
    try:
        assert fresh_sizing.measured == 29
        assert 0.9 < fresh_sizing.calibration / clean_calibration < 1.1
        assert all(0.8 < m.nbytes / clean_nbytes < 1.25 for m in models), [m.nbytes for m in models]
    finally:
        for model in clean + models:
            model.close()


@pytest.mark.skipif(predictor._mallinfo2 is None, reason="needs glibc mallinfo2")
def test_calibrated_estimates_are_within_25_percent_of_measurements(fresh_sizing, monkeypatch):
    shapes = [dict(num_trees=t, num_leaves=l, num_features=f, objective=o)
              for t, l, f, o in [(1, 2, 4, "regression"), (5, 7, 8, "binary"), (20, 15, 8, "regression"),
                                 (50, 31, 20, "binary"), (30, 15, 8, "multiclass"), (100, 63, 30, "regression"),
                                 (200, 31, 12, "binary"), (60, 127, 16, "regression")]]
    texts = [train_model_text(seed=i, **shape) for i, shape in enumerate(shapes)]
    monkeypatch.setattr(predictor, "_MEASURE_FIRST", 10**9)  # measure every load: calibrate, and the truth
    measured = []
    for text in texts * 2:
        model = LoadedModel.from_model_text(text)
        measured.append(model.nbytes)
        model.close()
    assert fresh_sizing.measured == len(texts) * 2 and fresh_sizing.estimated == 0
    monkeypatch.setattr(predictor, "_MEASURE_FIRST", 0)  # now nothing is due: every load is estimated
    estimated = []
    for text in texts:
        model = LoadedModel.from_model_text(text)
        estimated.append(model.nbytes)
        model.close()
    assert fresh_sizing.estimated == len(texts) and fresh_sizing.reads == 4 * len(texts)
    truth = measured[len(texts):]  # the second pass: malloc's free lists warm, like a worker's
    ratios = [e / m for e, m in zip(estimated, truth)]
    assert all(0.75 < r < 1.25 for r in ratios), ratios
    assert 0.9 < sum(estimated) / sum(truth) < 1.1  # what the LRU's byte total sees


def test_nbytes_estimate_without_mallinfo2_is_close_to_the_measurement(fresh_sizing, monkeypatch):
    text = train_model_text(seed=2, num_trees=100, num_leaves=31, objective="binary")
    measured = LoadedModel.from_model_text(text)  # the first load: always measured where possible
    monkeypatch.setattr(predictor, "_mallinfo2", None)  # as on musl or macOS
    estimated = LoadedModel.from_model_text(text)
    try:
        assert measured.nbytes > 0
        assert 0.8 < estimated.nbytes / measured.nbytes < 1.25
    finally:
        measured.close()
        estimated.close()


@pytest.mark.parametrize("row_predict", ROW_PATHS)
@pytest.mark.parametrize("num_features, objective", [(4, "regression"), (30, "multiclass"), (200, "binary")])
def test_nbytes_counts_the_models_python_objects(num_features, objective, row_predict):
    """The budget bounds what models hold, so nbytes includes their Python side (~5% of a
    small model): `_python_bytes` must match what tracemalloc sees a model allocate."""
    text = train_model_text(seed=1, num_features=num_features, num_trees=3, objective=objective)
    warm = [LoadedModel.from_model_text(text, row_predict) for _ in range(5)]  # first-use caches out of the way
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        models = [LoadedModel.from_model_text(text, row_predict) for _ in range(100)]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_model = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / len(models)
    assert 0.8 < predictor._python_bytes(num_features, models[0].num_classes, row_predict) / per_model < 1.25
    for model in warm + models:
        model.close()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_loading_and_closing_2000_models_does_not_grow_memory():
    text = train_model_text(seed=9)
    row = np.zeros(NUM_FEATURES)
    for _ in range(200):  # let malloc's arenas reach their steady state first
        m = LoadedModel.from_model_text(text)
        m.predict(row)
        m.close()
    before = rss_bytes()
    nbytes = 0
    for _ in range(2000):
        m = LoadedModel.from_model_text(text)
        m.predict(row)
        nbytes = m.nbytes
        m.close()
    grown = rss_bytes() - before
    # A leak of even a tenth of each model would be 2000 * nbytes / 10 (~7 MB) here.
    assert grown < 2000 * nbytes / 10, f"RSS grew {grown} bytes over 2000 load/close cycles"


# --- demo models -------------------------------------------------------------------------------

def test_demo_models_are_deterministic_and_differ_by_seed():
    assert train_model_text(seed=7) == train_model_text(seed=7)
    assert train_model_text(seed=7) != train_model_text(seed=8)
    x = sample_features(seed=7, rows=500, num_features=NUM_FEATURES)
    assert x.shape == (500, NUM_FEATURES) and x.dtype == np.float64
    assert 0 < np.isnan(x).mean() < 0.2
    with pytest.raises(ValueError, match="objective"):
        train_model_text(seed=1, objective="ranking")
