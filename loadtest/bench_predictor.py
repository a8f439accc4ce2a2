"""Microbenchmark: how close LoadedModel.predict gets to a raw LightGBM C call, and how far
Booster.predict is from both. Run as `python -m loadtest.bench_predictor` (~6 s).

Every call is timed on its own (perf_counter_ns around it, the timer's own median cost
subtracted), so p99 is a real per-call tail, not an average of averages. Contenders alternate in
short rounds so that CPU frequency changes and noisy neighbours hit them alike. The "raw" call
is LightGBM's fast single-row function called from Python through the library `lightgbm`
loaded, as cheaply as that goes: a ctypes binding with prebuilt arguments, no input copy, no
output copy, no checks. LoadedModel calls the same function from C (worker/_row_predict.c, with
its copy in and list out); its "ctypes path" rows show the same in Python around a ctypes call,
what a worker does where no C compiler was there at install.
Below both, "fast call in a C loop" times the same call with no Python per call at all (the
floor under any caller; `RowPredictor.time_calls`).

Single rows are also timed in a tight loop (`loop µs`: the best of LOOP_REPEATS timeit runs,
no clock between calls). The two views differ for sub-microsecond calls: reading the clock
around every call slows the shortest calls most, which flatters ratios over the raw call (on a
2-core box, 20 trees, ctypes path: 1.62 x the raw call timed per call, 1.73 x in the loop).
Both are printed.

A batch is also predicted row by row through the fast single-row call: on 100 distinct rows it
costs what the batch call does (a tree walk that the branch predictor cannot learn costs the same
through either API), so no faster walk is left in LightGBM's C API for batches. The single-row
rows repeat one row, which the branch predictor learns: per row they are 2-2.5 x cheaper than a
batch's rows for 100-200 trees.
"""
from __future__ import annotations

import os
import platform
import time
import timeit
from collections.abc import Callable
from statistics import median

import lightgbm
import numpy as np
from rich.console import Console
from rich.table import Table

from loadtest.cli import describe_only
from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.v1 import predictor_pb2
from worker import predictor
from worker.predictor import LoadedModel

NUM_FEATURES = 8
# (label, train_model_text kwargs, single-row calls per round, batch calls per round)
MODELS = [
    ("20 trees x 15 leaves", dict(num_trees=20, num_leaves=15), 2000, 200),
    ("200 trees x 31 leaves", dict(num_trees=200, num_leaves=31), 1000, 40),
    ("multiclass 3 x 50 trees", dict(objective="multiclass", num_trees=50, num_leaves=15), 1000, 60),
]
ROUNDS = 10
LOOP_REPEATS = 5
BATCH_ROWS = 100
PATH_NOTE = "" if predictor.ROW_PREDICT == "c" else ", ctypes path: C not built"


def timer_overhead_ns() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = clock()
        samples.append(clock() - t0)
    return median(samples)


def time_calls(fn: Callable[[], object], calls: int, into: list[float], overhead_ns: float) -> None:
    clock = time.perf_counter_ns
    for _ in range(calls):
        t0 = clock()
        fn()
        into.append((clock() - t0 - overhead_ns) / 1000.0)


def run(contenders: dict[str, Callable[[], object]], calls: int, overhead_ns: float) -> dict[str, list[float]]:
    """µs per call for each contender, interleaved in ROUNDS rounds after a warm-up."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        time_calls(fn, max(calls // 10, 10), [], overhead_ns)
    for _ in range(ROUNDS):
        for name, fn in contenders.items():
            time_calls(fn, calls, samples[name], overhead_ns)
    return samples


def loop_us(contenders: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """µs per call in a tight loop, best of LOOP_REPEATS rounds, contenders taking turns."""
    best = {name: float("inf") for name in contenders}
    for _ in range(LOOP_REPEATS):
        for name, fn in contenders.items():
            best[name] = min(best[name], timeit.timeit(fn, number=calls) / calls * 1e6)
    return best


def c_loop_us(model: LoadedModel, row: np.ndarray, calls: int) -> float | None:
    """µs per fast call made in a C loop on `row` (no Python per call): the floor under any
    caller, best of LOOP_REPEATS; None without the C path."""
    if model._row_predictor is None:
        return None
    model.predict(row)  # the row the C loop predicts
    return min(model._row_predictor.time_calls(calls) for _ in range(LOOP_REPEATS)) / calls * 1e6


def stats(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_model(label: str, kwargs: dict, single_calls: int, batch_calls: int, overhead_ns: float,
                table: Table) -> None:
    text = train_model_text(seed=1, num_features=NUM_FEATURES, **kwargs)
    model = LoadedModel.from_model_text(text)
    booster = lightgbm.Booster(model_str=text)
    x = sample_features(seed=2, rows=BATCH_ROWS, num_features=NUM_FEATURES)
    row, row_2d, flat = x[7].copy(), x[7:8].copy(), x.reshape(-1).copy()
    row_list = row.tolist()
    row_proto = predictor_pb2.PredictRequest(features=row_list).features  # what the worker's servicer passes
    raw_call, raw_args = predictor._fast_predict, model._fast_args
    model._row_view[:] = row  # the raw call's row: the same as every contender's (a tree walk's cost depends on it)
    on_ctypes = LoadedModel.from_model_text(text, row_predict="ctypes")

    contenders = {
        "raw C fast call": lambda: raw_call(*raw_args),
        f"LoadedModel (ndarray{PATH_NOTE})": lambda: model.predict(row),
        f"LoadedModel (list{PATH_NOTE})": lambda: model.predict(row_list),
        f"LoadedModel (protobuf{PATH_NOTE})": lambda: model.predict(row_proto),
        "Booster.predict": lambda: booster.predict(row_2d),
    }
    if predictor.ROW_PREDICT == "c":
        contenders["LoadedModel, ctypes path (ndarray)"] = lambda: on_ctypes.predict(row)
        contenders["LoadedModel, ctypes path (protobuf)"] = lambda: on_ctypes.predict(row_proto)
    single = run(contenders, single_calls, overhead_ns)
    loop = loop_us(contenders, single_calls)
    c_loop = c_loop_us(model, row, single_calls)
    rows = [x[i].copy() for i in range(BATCH_ROWS)]
    batch = run({
        "LoadedModel (1 thread)": lambda: model.predict(flat),  # predictor._BATCH_PARAMETERS
        "LoadedModel, row by row (fast call)": lambda: [model.predict(r) for r in rows],
        "Booster.predict (all cores)": lambda: booster.predict(x),
    }, batch_calls, overhead_ns)

    raw_med = stats(single["raw C fast call"])[0]
    loaded_med = stats(single[f"LoadedModel (ndarray{PATH_NOTE})"])[0]
    per_c_loop = (lambda us: f"{us / c_loop:.2f}") if c_loop else (lambda us: "")
    if c_loop:
        table.add_row(label, "1 row", "fast call in a C loop", "", "", "", "", f"{c_loop:.2f}",
                      f"{c_loop / loop['raw C fast call']:.2f}", "1.00")
        label = ""
    for name, values in single.items():
        med, p99 = stats(values)
        table.add_row(label, "1 row", name, f"{med:.2f}", f"{p99:.2f}", f"{med / raw_med:.2f}",
                      f"{med / loaded_med:.2f}", f"{loop[name]:.2f}", f"{loop[name] / loop['raw C fast call']:.2f}",
                      per_c_loop(loop[name]))
        label = ""
    batch_loaded = stats(batch["LoadedModel (1 thread)"])[0]
    for name, values in batch.items():
        med, p99 = stats(values)
        table.add_row("", f"{BATCH_ROWS} rows", name, f"{med:.1f}", f"{p99:.1f}", "",
                      f"{med / batch_loaded:.2f}")
    table.add_section()
    model.close()
    on_ctypes.close()


def main() -> None:
    describe_only(__doc__)
    console = Console(width=165)
    started = time.perf_counter()
    overhead_ns = timer_overhead_ns()
    table = Table(title="µs per call (timer overhead subtracted; loop: a tight loop, no clock between calls)")
    for column in ("model", "input", "contender"):
        table.add_column(column)
    for column in ("median µs", "p99 µs", "÷ raw", "÷ LoadedModel", "loop µs", "loop ÷ raw", "loop ÷ C loop"):
        table.add_column(column, justify="right")
    for label, kwargs, single_calls, batch_calls in MODELS:
        bench_model(label, kwargs, single_calls, batch_calls, overhead_ns, table)
    console.print(table)
    console.print(f"os.cpu_count()={os.cpu_count()}  python {platform.python_version()}  "
                  f"lightgbm {lightgbm.__version__}  numpy {np.__version__}  "
                  f"timer overhead {overhead_ns:.0f} ns  {NUM_FEATURES} features  "
                  f"single rows: {predictor.ROW_PREDICT}  "
                  f"took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
