"""One loaded LightGBM model, predicting through the C API with as little Python as possible.

Why not `lightgbm.Booster.predict`: for one row it spends ~30 µs in Python (input checks and
conversions, a fresh predictor per call) around a tree walk of 0.5-5 µs. Here a single row goes
through LightGBM's "fast" single-row API, called from C (worker/_row_predict.c: copy in, call,
list out, ~0.05 µs on top of the call from ctypes; `python -m loadtest.bench_predictor`), or
where that was not built, from Python with every ctypes argument built once at load (~0.6 µs
more); a batch goes straight to `LGBM_BoosterPredictForMat`. All give exactly the
values `Booster.predict` gives (normal prediction: probabilities for binary and multiclass).

Native resources (the booster and its fast config) are freed exactly once: `close()` hands them
to a `weakref.finalize`, which runs at most once however many threads race to it, and which also
frees them if a model is dropped without being closed.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from modelfleet import allocator
from modelfleet.errors import FailedPrecondition, InvalidArgument, ModelfleetError
from modelfleet.v1 import predictor_pb2

Features = Sequence[float] | np.ndarray
# The type of a protobuf message's repeated double field (upb's container), which numpy converts in
# one C pass; other sequences are read item by item.
_RepeatedScalar = type(predictor_pb2.PredictRequest().features)
_ndarray = np.ndarray  # one global lookup instead of two on the hot path

_C_API_PREDICT_NORMAL = 0
_C_API_DTYPE_FLOAT64 = 1
_ROW_MAJOR = 1
_ALL_ITERATIONS = -1  # what Booster.predict uses for a booster loaded from text
# The fast single-row path never runs in parallel; one thread also makes LightGBM allocate one
# scratch row per fast config instead of one per core.
_FAST_PARAMETERS = b"num_threads=1"
# Batches run on one thread too. A worker is shared by many tenants: one tenant's big batch must
# not take every core (an OpenMP team across all cores also waits for its slowest, possibly
# preempted, thread: measured p99 ~2 ms vs ~0.15 ms single-threaded on a busy 2-core machine).
# Parallelism comes from serving several requests at once on the predict pool instead.
_BATCH_PARAMETERS = b"num_threads=1"
# How long `close` sleeps between looks while another thread finishes a single-row call.
_TOKEN_WAIT_S = 20e-6



def _lightgbm_library_path() -> str:
    """The shared library `import lightgbm` loads, found by lightgbm's own lookup (its `libpath`
    module, which needs only the standard library), without importing the package: that imports
    SciPy and costs ~0.35 s of every worker's start for nothing the C API needs."""
    spec = importlib.util.find_spec("lightgbm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lightgbm is not installed")
    libpath_spec = importlib.util.spec_from_file_location(
        "_modelfleet_lightgbm_libpath", Path(spec.submodule_search_locations[0]) / "libpath.py")
    libpath = importlib.util.module_from_spec(libpath_spec)
    libpath_spec.loader.exec_module(libpath)
    return libpath._find_lib_path()[0]


# Our own handles on LightGBM's shared library (the dlopen handle lightgbm also gets, separate
# function objects), so setting argtypes here never changes the prototypes lightgbm's own code
# relies on where a process imports both.
# Calls that can take milliseconds (parsing, freeing a model, batches) go through `_lib`
# (CDLL), which releases the GIL. Calls that take microseconds go through `_quick` (PyDLL),
# which keeps it: releasing it would cost more than it saves, because on return a thread can
# wait up to the 5 ms switch interval to get the GIL back from a busy event loop thread, and a
# load that released it after each of its small calls paid that wait each time.
LIGHTGBM_LIBRARY = _lightgbm_library_path()
_lib = ctypes.CDLL(LIGHTGBM_LIBRARY)
_quick = ctypes.PyDLL(LIGHTGBM_LIBRARY)
_fast_predict = _quick.LGBM_BoosterPredictForMatSingleRowFast
_FAST_PREDICT_ADDRESS = ctypes.cast(_fast_predict, ctypes.c_void_p).value

try:  # the same fast call from C (worker/_row_predict.c), built by `pip install` where a C compiler is
    from worker._row_predict import RowPredictor
except ImportError:  # no compiler at install: single rows take the ctypes path below (~0.6 µs more)
    RowPredictor = None
ROW_PREDICT = "c" if RowPredictor is not None else "ctypes"  # the single-row path models take by default
try:  # a load's line cut in C (worker/_model_text.c), built alongside; else the regex below
    from worker._model_text import cut_training_lines
except ImportError:
    cut_training_lines = None

_p = ctypes.c_void_p
_int = ctypes.c_int
_quick.LGBM_GetLastError.restype = ctypes.c_char_p
_quick.LGBM_GetLastError.argtypes = []
_lib.LGBM_BoosterLoadModelFromString.argtypes = [ctypes.c_char_p, ctypes.POINTER(_int), ctypes.POINTER(_p)]
_quick.LGBM_BoosterGetNumFeature.argtypes = [_p, ctypes.POINTER(_int)]
_quick.LGBM_BoosterGetNumClasses.argtypes = [_p, ctypes.POINTER(_int)]
_quick.LGBM_BoosterNumberOfTotalModel.argtypes = [_p, ctypes.POINTER(_int)]
_quick.LGBM_BoosterPredictForMatSingleRowFastInit.argtypes = [
    _p, _int, _int, _int, _int, ctypes.c_int32, ctypes.c_char_p, ctypes.POINTER(_p)]
_lib.LGBM_BoosterPredictForMat.argtypes = [
    _p, _p, _int, ctypes.c_int32, ctypes.c_int32, _int, _int, _int, _int, ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int64), _p]
_quick.LGBM_FastConfigFree.argtypes = [_p]
_lib.LGBM_BoosterFree.argtypes = [_p]


def _last_error() -> str:
    return _quick.LGBM_GetLastError().decode("utf-8", "replace")


# --- measuring native memory -------------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _find_mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc >= 2.33's mallinfo2, or None (musl, macOS, ...)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.argtypes = []
    fn.restype = _MallInfo2
    return fn


def _find_jemalloc_thread_heap() -> Callable[[], int] | None:
    """Under jemalloc (modelfleet.allocator): a reader of the bytes the calling thread has
    allocated minus those it has freed; None under any other malloc."""
    mallctl = allocator.mallctl()
    if mallctl is None:
        return None

    def read() -> int:
        allocated, freed = ctypes.c_uint64(), ctypes.c_uint64()
        size, size_freed = ctypes.c_size_t(8), ctypes.c_size_t(8)
        if (mallctl(b"thread.allocated", ctypes.byref(allocated), ctypes.byref(size), None, 0)
                or mallctl(b"thread.deallocated", ctypes.byref(freed), ctypes.byref(size_freed), None, 0)):
            return -1
        return allocated.value - freed.value

    return read if read() >= 0 else None


_thread_heap = _find_jemalloc_thread_heap()
_mallinfo2 = None if _thread_heap is not None else _find_mallinfo2()


_CALIBRATION_SAMPLES = 15


@dataclass
class Sizing:
    """How loads got their `nbytes`, and what the measured ones taught the estimate.

    mallinfo2 walks every free chunk of every arena under the arena locks: ~1 ms with 1000
    cached models after some churn, ~9 ms with 5000 (measured on this project's 2-core box),
    twice per load, stalling every other thread's malloc meanwhile; in a miss-heavy benchmark
    a 1-in-64 sample alone took ~10 ms per read, a fifth of all parsing time. So only a sample
    of loads is measured: the first `_MEASURE_FIRST`, then the next load that runs alone after
    every `_MEASURE_EVERY` loads, and no sooner than the last sample's mallinfo2 time divided
    by `_MEASURE_TIME_SHARE` (the reads get at most that share of the time, however large the
    heap). The rest get the structural estimate times `calibration`, the median ratio
    measured / estimated of the last `_CALIBRATION_SAMPLES` samples, so the cache's byte total
    stays honest on average (each demo model's estimate is within ~20% of its measurement).

    Under jemalloc (modelfleet.allocator) a reading is two cheap per-thread counters, so the
    time share is never what holds a sample back; the same sampling applies.

    A median, not a mean: mallinfo2 sees every thread's allocations, and in a busy worker
    about one sample in five read ~2x the model's size (something else of about a model's
    size was allocated meanwhile: most likely another request's artifact being read). A
    running mean took those in and over-counted every model by ~15% (a benchmark worker held
    886 models in a budget sized for 1000); the median ignores them, and an outlying
    sample's own model gets the calibrated estimate instead of its reading.
    """

    measured: int = 0
    estimated: int = 0
    calibration: float = 1.0
    due: bool = False  # a sample is owed: the next load that runs alone is measured
    next_sample_at: float = 0.0  # time.monotonic() before which no sample is taken
    read_seconds: float = 0.0  # spent in mallinfo2, in total
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_CALIBRATION_SAMPLES))


sizing = Sizing()
_MEASURE_FIRST = 32
_MEASURE_EVERY = 64
_MEASURE_TIME_SHARE = 0.01
_OUTLIER_RATIO = 1.5  # a reading this far from the calibrated estimate (either way) is not trusted
# Held only around a parse's bookkeeping, so two loads in different threads never see each
# other's bytes. Loads run in parallel (a worker's load pool); a load is measured only when it
# ran alone, so no other parse's allocations land in its delta.
_load_state = threading.Lock()
_loads_active = 0
_loads_started = 0


def _heap_bytes_in_use() -> int:
    """A heap reading whose growth across a parse is what the parse kept; -1 if unknown.

    Under jemalloc: the bytes this thread allocated minus those it freed (a parse runs in the
    calling thread, so other threads' allocations never land in it; two mallctl reads, ~1 µs).
    Under glibc: the bytes malloc has handed out and not had back over all arenas (mallinfo2:
    µs on a fresh heap, ms on a large fragmented one, see `Sizing`)."""
    if _thread_heap is not None:
        return _thread_heap()
    if _mallinfo2 is None:
        return -1
    info = _mallinfo2()
    return info.uordblks + info.hblkhd  # small chunks in arenas + large mmapped chunks


# Fitted to mallinfo2 measurements of demo models (1 to 300 trees of 2 to 127 leaves, 4 to 30
# features), all within 20%: ~6 KiB for the booster, its header and the fast config, ~690 bytes
# per tree and ~63 per leaf (the split, threshold, child and value arrays).
_EST_FIXED, _EST_PER_TREE, _EST_PER_LEAF = 5_800, 690, 63
_NUM_LEAVES_RE = re.compile(rb"\nnum_leaves=(\d+)")  # a literal prefix: ~12x faster than ^ with MULTILINE
_TREE_HEAD_RE = re.compile(rb"Tree=\d+\nnum_leaves=(\d+)\n")


def _python_bytes(num_features: int, num_classes: int, row_predict: str = "ctypes") -> int:
    """What a LoadedModel's own Python objects take beside the booster (tracemalloc: ~2.5 KB
    for 8 features): the instance, its ctypes and numpy buffers, views, lock, finalizer, and
    on the C path a RowPredictor with buffers of its own."""
    c_path = 80 + 8 * (num_features + num_classes) if row_predict == "c" else 0
    return 2_450 + 8 * (num_features + num_classes) + c_path


def _estimate_nbytes(trees: int, leaves: int) -> int:
    """A per-tree/per-leaf formula, scaled by `sizing.calibration` where it is used."""
    return _EST_FIXED + _EST_PER_TREE * trees + _EST_PER_LEAF * leaves


def _count_leaves(data: bytes, trees_at: int, tree_sizes: list[int] | None) -> int:
    """The leaves of every tree in a model text.

    With the `tree_sizes=` index, each tree's header is matched where the index says it starts
    (~0.3 µs a tree); scanning the whole text instead costs ~0.45 µs per KB: ~140 µs for a
    300 KB model, on every load. A text without the index, or whose index does not point at
    tree headers, is scanned."""
    if tree_sizes is not None:
        match, leaves, at = _TREE_HEAD_RE.match, 0, trees_at
        for size in tree_sizes:
            head = match(data, at)
            if head is None:
                break
            leaves += int(head[1])
            at += size
        else:
            return leaves
    return sum(int(n) for n in _NUM_LEAVES_RE.findall(data))


# --- loading -----------------------------------------------------------------------------------

@dataclass
class _ModelText:
    data: bytes  # what LightGBM parses: the text without its index and training-only lines, a sentinel
    declared_trees: int | None  # how many trees the index declares (None without an index)
    leaves: int  # over all trees


def _parseable_bytes(text: str | bytes) -> _ModelText:
    """The model text as bytes LightGBM 4.7 can parse without crashing the whole process, the
    number of trees the text declares, and its leaves (for the size estimate).

    LightGBM's model parser trusts its input: given a truncated text (an interrupted upload or
    copy) it reads past the end of the buffer, and a malformed tree found while parsing trees in
    parallel (which the `tree_sizes=` index enables) aborts the process from inside OpenMP
    instead of returning an error. So: refuse NUL bytes (the C side would stop there) and texts
    shorter than their `tree_sizes=` index says, then drop that index so trees are parsed
    sequentially and errors come back as errors (sequential parsing is no slower for
    fleet-sized models), and end the buffer with a sentinel that stops every scan of the tree
    parser before the end of the buffer. This makes truncation and garbage safe; a text that
    parses but is internally inconsistent (bit flips, hand edits) can still crash, so artifacts
    must come from a trusted writer and be checked against their digest.

    Lines only training tools read are cut too: they are ~45% of a model text, and the parse, a
    load's main cost, grows with the text (see `_TRAINING_ONLY_LINES`).

    Bytes (an artifact as read from the store) are taken as they are once they are known to be
    UTF-8 (ASCII, for every model LightGBM writes without non-ASCII feature names: a check of
    ~4 µs per 100 KB), not decoded to a str and encoded back (~60 µs more for a 300 KB model);
    the cut and the sentinel then copy what remains (~10 µs).
    """
    if isinstance(text, str):
        data = text.encode("utf-8")
    else:
        data = bytes(text)
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise FailedPrecondition("cannot load LightGBM model: model text is not UTF-8") from None
    if b"\x00" in data:
        raise FailedPrecondition("cannot load LightGBM model: model text contains a NUL byte")
    index_at = data.find(b"\ntree_sizes=")
    if index_at < 0:
        declared_trees, leaves = None, _count_leaves(data, 0, None)
    else:
        index_end = data.find(b"\n", index_at + 1)
        index_end = len(data) if index_end < 0 else index_end
        try:
            sizes = [int(size) for size in data[index_at + len(b"\ntree_sizes="):index_end].split()]
        except ValueError:
            raise FailedPrecondition("cannot load LightGBM model: malformed tree_sizes") from None
        trees_at = data.find(b"\nTree=", index_end) + 1  # where LightGBM's offsets start from
        if trees_at == 0 or len(data) < trees_at + sum(sizes):
            raise FailedPrecondition(f"cannot load LightGBM model: the text is truncated (its "
                                     f"{len(sizes)} trees need {sum(sizes)} bytes)")
        declared_trees, leaves = len(sizes), _count_leaves(data, trees_at, sizes)
    return _ModelText(_serving_lines(data, _SENTINEL), declared_trees, leaves)  # the index is a line cut


_SENTINEL = b"\n=\n\n"
# What LightGBM's tree parser reads only to keep for training tools (split gain importance,
# SHAP, refit) and fills with zeros when it is missing: each tree's split_gain line and its
# leaf_weight .. internal_count lines, which LightGBM writes as one run in this order; and
# the `tree_sizes=` index (see `_parseable_bytes`). Prediction never reads them, so values stay
# bit-identical to `Booster.predict` on the whole text (tested on every objective, categorical
# splits and linear trees). They are ~45% of the text, and a parse costs in proportion to the
# text: a 100-tree x 31-leaf model (318 KB) parses in ~0.82 ms instead of ~1.35 ms, for ~0.03 ms
# of cutting in C (worker/_model_text.c), ~0.24 ms with this regex where that was not built
# (measured on this project's 2-core box). Lines are cut only where they match whole, in
# LightGBM's order; a text laid out otherwise keeps them.
_TRAINING_ONLY_LINES = re.compile(
    rb"\ntree_sizes=[^\n]*|\nsplit_gain=[^\n]*"
    rb"|\nleaf_weight=[^\n]*\nleaf_count=[^\n]*\ninternal_value=[^\n]*\ninternal_weight=[^\n]*\ninternal_count=[^\n]*")


def _serving_lines(data: bytes, tail: bytes = b"") -> bytes:
    """The model text without `_TRAINING_ONLY_LINES`, then `tail`: in C where it was built (the
    same substitution, tested against this regex), else with the regex."""
    if cut_training_lines is not None:
        return cut_training_lines(data, tail)
    return _TRAINING_ONLY_LINES.sub(b"", data) + tail


def _row_predict_path(row_predict: str | None) -> str:
    """"c" or "ctypes": the one asked for (ROW_PREDICT if none), if it exists here."""
    row_predict = row_predict or ROW_PREDICT
    if row_predict not in ("c", "ctypes"):
        raise ValueError(f"row_predict must be 'c' or 'ctypes', not {row_predict!r}")
    if row_predict == "c" and RowPredictor is None:
        raise ValueError("the C single-row path was not built (worker/_row_predict.c needs a C compiler at install)")
    return row_predict


def _get_int(fn: Callable[..., int], booster: int) -> int:
    out = _int()
    if fn(booster, ctypes.byref(out)) != 0:
        raise FailedPrecondition(f"cannot read LightGBM model: {_last_error()}")
    return out.value


def _load_booster(data: bytes) -> int:
    handle, iterations = _p(), _int()
    if _lib.LGBM_BoosterLoadModelFromString(data, ctypes.byref(iterations), ctypes.byref(handle)) != 0:
        raise FailedPrecondition(f"cannot load LightGBM model: {_last_error()}")
    assert handle.value is not None
    return handle.value


def _init_fast_config(booster: int, num_features: int) -> int:
    fast_config = _p()
    rc = _quick.LGBM_BoosterPredictForMatSingleRowFastInit(
        booster, _C_API_PREDICT_NORMAL, 0, _ALL_ITERATIONS, _C_API_DTYPE_FLOAT64, num_features,
        _FAST_PARAMETERS, ctypes.byref(fast_config))
    if rc != 0:
        raise FailedPrecondition(f"cannot prepare LightGBM model for prediction: {_last_error()}")
    assert fast_config.value is not None
    return fast_config.value


def _free_native(fast_config: int, booster: int, row_predictor: RowPredictor | None = None) -> None:
    """Runs exactly once per model, from `weakref.finalize` (see the module docstring). The
    model's RowPredictor forgets the fast config first, so that it never calls a freed one, even
    where someone kept it beyond the model."""
    if row_predictor is not None:
        row_predictor.close()
    _quick.LGBM_FastConfigFree(fast_config)
    _lib.LGBM_BoosterFree(booster)


# --- the model ---------------------------------------------------------------------------------

class LoadedModel:
    """A parsed LightGBM booster ready to predict, shared by every thread of a worker.

    Thread safety: a single-row prediction uses buffers preallocated per model (allocating
    them per call would double its cost). The C path holds the GIL from copy in to list out,
    so no other thread can use them meanwhile (worker/_row_predict.c says how it handles the one
    exception); on the ctypes path they belong to whoever holds the model's token (see
    `_predict_row_ctypes`). A thread that finds them taken predicts with buffers of its own. The fast
    call keeps the GIL, so only one thread is ever inside it: per-thread fast configs would
    buy nothing, would multiply native memory by the thread count, and would make "freed
    exactly once" a cross-thread bookkeeping problem. Batches register as in flight under the
    model's lock, then predict concurrently with fresh buffers.

    Lifetime: `close()` frees the native model, unless it is borrowed or a batch is in flight,
    in which case the last of those frees it. Until then predictions keep working (they may come
    from a borrower); afterwards they raise FailedPrecondition, and so does `borrow()` once
    `close()` has been called.
    """

    num_features: int
    num_classes: int
    nbytes: int
    # Provenance, set by the worker's loader (worker.loading): the digest of the artifact it was
    # parsed from, and whether that digest came from the tenant's version record in etcd (True)
    # or from a caller's artifact hint, not yet checked against the record (False).
    artifact_sha256: str | None = None
    record_checked: bool = True
    num_trees: int = 0  # trees over all classes: a row costs a walk of each (0 = unknown)

    def __init__(self, booster: int, fast_config: int, num_features: int, num_classes: int,
                 nbytes: int, row_predict: str | None = None) -> None:
        """Takes ownership of both native handles; use `from_model_text`. `row_predict`: "c"
        or "ctypes", the single-row path (default ROW_PREDICT: C where it was built)."""
        self.num_features = num_features
        self.num_classes = num_classes
        self.nbytes = nbytes
        self._lock = threading.Lock()
        self._users = 0  # borrowers and batches in flight
        self._close_requested = False
        self._freed = False
        try:
            self._row_predictor = (RowPredictor(_FAST_PREDICT_ADDRESS, fast_config, num_features, num_classes)
                                   if _row_predict_path(row_predict) == "c" else None)
        except BaseException:  # owned from the start: freed here if this never becomes a model
            _free_native(fast_config, booster)
            raise
        self._finalizer = weakref.finalize(self, _free_native, fast_config, booster, self._row_predictor)
        self._finalizer.atexit = False  # the process is exiting anyway
        self._booster = _p(booster)
        self._fast_config = _p(fast_config)
        # The single-row buffers, owned by whoever took the token from `_idle`: one ctypes
        # array, and a memoryview of the same memory because it copies a float64 array fastest.
        self._row_type = ctypes.c_double * num_features
        self._row = self._row_type()
        self._row_view = memoryview(np.frombuffer(self._row, dtype=np.float64))
        # The output buffer, read back as the list the response needs through a plain float64
        # memoryview: its `tolist` is one C call, ~70 ns cheaper than an ndarray's.
        self._out = (ctypes.c_double * num_classes)()
        self._out_values = memoryview(self._out).cast("B").cast("d").tolist
        self._out_len = ctypes.c_int64()
        # Every argument already in the form ctypes passes to C (what `byref` and `from_param`
        # return): a c_void_p instead costs a conversion object per argument per call, ~110 ns
        # of a ~0.8 µs call for a small model.
        self._fast_args = (_p.from_param(fast_config), ctypes.byref(self._row),
                           ctypes.byref(self._out_len), ctypes.byref(self._out))
        self._idle = [True]

    @classmethod
    def from_model_text(cls, text: str | bytes, row_predict: str | None = None) -> LoadedModel:
        """Parses a LightGBM model text (a str, or its UTF-8 bytes); FailedPrecondition if
        LightGBM can't.

        `nbytes` is what the model holds: LightGBM's allocations plus the model's own Python
        objects (`_python_bytes`). LightGBM's part is measured for a sample of loads (see
        `Sizing`): the growth of a heap reading across the parse (`_heap_bytes_in_use`),
        when no other load overlapped it (under glibc, other threads' small allocations during
        the parse still land in it). Every other load, and every load where no reading is
        possible or the reading is implausible, gets the per-tree/per-leaf estimate scaled by
        the ratio the measured loads have shown.
        """
        global _loads_active, _loads_started
        row_predict = _row_predict_path(row_predict)  # before anything native is made
        model_text = _parseable_bytes(text)
        data, declared_trees = model_text.data, model_text.declared_trees
        with _load_state:
            _loads_active += 1
            _loads_started += 1
            ticket = _loads_started
            if ticket % _MEASURE_EVERY == 0:
                sizing.due = True
            measure = ((_thread_heap is not None or _mallinfo2 is not None) and _loads_active == 1
                       and (sizing.measured < _MEASURE_FIRST
                            or (sizing.due and time.monotonic() >= sizing.next_sample_at)))
        try:
            read_started = time.monotonic()
            before = _heap_bytes_in_use() if measure else -1
            read_seconds = time.monotonic() - read_started
            booster = _load_booster(data)
            try:
                trees = _get_int(_quick.LGBM_BoosterNumberOfTotalModel, booster)
                if declared_trees is not None and trees != declared_trees:
                    raise FailedPrecondition(f"cannot load LightGBM model: the text declares "
                                             f"{declared_trees} trees but LightGBM read {trees}")
                num_features = _get_int(_quick.LGBM_BoosterGetNumFeature, booster)
                num_classes = _get_int(_quick.LGBM_BoosterGetNumClasses, booster)
                fast_config = _init_fast_config(booster, num_features)
            except BaseException:
                _lib.LGBM_BoosterFree(booster)
                raise
            read_started = time.monotonic()
            after = _heap_bytes_in_use() if measure else -1
            read_seconds += time.monotonic() - read_started
        finally:
            with _load_state:
                _loads_active -= 1
                alone = _loads_started == ticket  # nobody started while we parsed
        estimate = _estimate_nbytes(trees, model_text.leaves)
        measured = after - before if measure and alone and before >= 0 else 0
        with _load_state:
            if measure:  # mallinfo2 was read, whether or not the reading is usable
                sizing.read_seconds += read_seconds
                sizing.next_sample_at = time.monotonic() + read_seconds / _MEASURE_TIME_SHARE
            if measured > 0:
                sizing.measured += 1
                sizing.due = False
                sizing.recent.append(measured / estimate)
                sizing.calibration = statistics.median(sizing.recent)
                calibrated = estimate * sizing.calibration
                trusted = calibrated / _OUTLIER_RATIO <= measured <= calibrated * _OUTLIER_RATIO
                nbytes = measured if trusted else int(calibrated)
            else:
                sizing.estimated += 1
                nbytes = int(estimate * sizing.calibration)
        nbytes += _python_bytes(num_features, num_classes, row_predict)
        model = cls(booster, fast_config, num_features, num_classes, nbytes=nbytes, row_predict=row_predict)
        model.num_trees = trees
        return model

    def __repr__(self) -> str:
        state = "closed" if self._close_requested else "open"
        return (f"LoadedModel(num_features={self.num_features}, num_classes={self.num_classes}, "
                f"nbytes={self.nbytes}, {state})")

    def predict(self, features: Features) -> list[float]:
        """Predicts rows of row-major float64 features; returns rows * num_classes values, as
        the list a response carries.

        NaN and +/-inf are valid features (LightGBM treats NaN as missing).

        One row given as a 1-D float64 array, a list or a protobuf repeated field is the hot
        path: the fast call is ~0.5 µs of tree walk for a small model, so what surrounds it
        matters as much. By default that is one C function (`RowPredictor`, worker/_row_predict.c):
        copy in, call, list out. Without it (`row_predict="ctypes"`, or no compiler at install),
        the same in Python around a ctypes call, ~0.6 µs more: see `_predict_row_ctypes`.
        Anything else (batches, other dtypes and shapes, bad input, a closed model) goes to
        `_predict_any`, which validates and says what is wrong.
        """
        row_predictor = self._row_predictor
        if row_predictor is None:
            return self._predict_row_ctypes(features)
        values = row_predictor(features)  # None: not one row it takes, or a closed model
        return self._predict_any(features) if values is None else values

    def _predict_row_ctypes(self, features: Features) -> list[float]:
        """`predict` without the C path, kept to a token, one copy in and one list out. The
        model's single set of row buffers is guarded by a token in `self._idle`: `list.pop` and
        `list.append` are each one C call, so taking and giving it back is atomic (~30 ns, a
        third of a lock). The copy in is also the shape check: a memoryview only takes a 1-D
        float64 array of exactly `num_features`, and a ctypes array only a sequence of exactly
        that length. Anything else, or a token held by another thread, goes to `_predict_any`.
        """
        idle = self._idle
        try:
            idle.pop()
        except IndexError:
            return self._predict_any(features)
        try:
            if isinstance(features, _ndarray):
                self._row_view[:] = features  # a memcpy
            else:
                self._row[:] = features  # ctypes converts lists and repeated fields fastest
            if _fast_predict(*self._fast_args):
                raise ModelfleetError(f"LightGBM prediction failed: {_last_error()}")
            return self._out_values()
        except (TypeError, ValueError, OverflowError):
            pass  # not a row in a form the buffers take directly: see below, token given back
        finally:
            idle.append(True)
        return self._predict_any(features)

    def _predict_any(self, features: Features) -> list[float]:
        """Every input `predict` did not take on its hot path: validates, then one fast call
        with buffers of its own for one row, or one LGBM_BoosterPredictForMat for many."""
        try:
            n = features.size if isinstance(features, _ndarray) else len(features)
        except TypeError:
            raise InvalidArgument(
                f"features must be a sequence of numbers, got {type(features).__name__}") from None
        if n != self.num_features:
            return self._predict_rows(features, n)
        row = self._row_type()
        try:
            if isinstance(features, _ndarray):
                np.frombuffer(row, dtype=np.float64)[:] = features.reshape(-1)
            else:
                row[:] = features
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"features must be numbers: {exc}") from None
        out = np.empty(self.num_classes, dtype=np.float64)
        out_len = ctypes.c_int64()
        self._acquire(for_borrow=False)  # a close now waits for this call to end
        try:
            rc = _fast_predict(self._fast_config, row, ctypes.byref(out_len), _p(out.ctypes.data))
        finally:
            self._release()
        if rc:
            raise ModelfleetError(f"LightGBM prediction failed: {_last_error()}")
        return out.tolist()

    def _predict_rows(self, features: Features, n: int) -> list[float]:
        """Any number of rows but one: validation, then one LGBM_BoosterPredictForMat call."""
        per_row = self.num_features
        if n == 0:
            raise InvalidArgument(f"empty features: expected a multiple of {per_row} features "
                                  f"({per_row} per row), got 0")
        if n % per_row:
            raise InvalidArgument(f"expected a multiple of {per_row} features ({per_row} per row), got {n}")
        try:
            if isinstance(features, _ndarray):
                data = np.ascontiguousarray(features, dtype=np.float64)
            elif type(features) is _RepeatedScalar:  # a request's doubles: ~7 µs for 800, fromiter ~68
                data = np.array(features, dtype=np.float64)
            else:
                data = np.fromiter(features, dtype=np.float64, count=n)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"features must be numbers: {exc}") from None
        rows = n // per_row
        out = np.empty(rows * self.num_classes, dtype=np.float64)
        out_len = ctypes.c_int64()
        self._acquire(for_borrow=False)
        try:
            rc = _lib.LGBM_BoosterPredictForMat(
                self._booster, data.ctypes.data, _C_API_DTYPE_FLOAT64, rows, per_row, _ROW_MAJOR,
                _C_API_PREDICT_NORMAL, 0, _ALL_ITERATIONS, _BATCH_PARAMETERS,
                ctypes.byref(out_len), out.ctypes.data)
        finally:
            self._release()
        if rc != 0:
            raise ModelfleetError(f"LightGBM prediction failed: {_last_error()}")
        if out_len.value != out.size:
            raise ModelfleetError(f"LightGBM returned {out_len.value} predictions, expected {out.size}")
        return out.tolist()

    @contextmanager
    def borrow(self, *, while_closing: bool = False) -> Iterator[LoadedModel]:
        """Keeps the native model alive across a `close()` until the block ends.

        For a cache that may evict (close) a model while a request is still using it: the
        request borrows, the eviction closes, and the last one out frees. Once `close()` was
        called there are no new borrowers, except with `while_closing` for a caller that knows
        someone still holds the model (a miss's waiter: the cache's delivery hold, `retain`).
        """
        self._acquire(for_borrow=not while_closing)
        try:
            yield self
        finally:
            self._release()

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (the model can no longer be borrowed)."""
        return self._close_requested

    def retain(self) -> None:
        """`borrow()` for a holder that lets go from elsewhere (a callback): `release()` once."""
        self._acquire(for_borrow=True)

    def release(self) -> None:
        self._release()

    def close(self) -> None:
        """Frees the native model now, or when the last borrower leaves. Idempotent."""
        with self._lock:
            if self._close_requested:
                return
            self._close_requested = True
            if self._users == 0:
                self._free_locked()

    def _acquire(self, *, for_borrow: bool) -> None:
        with self._lock:
            if self._freed or (for_borrow and self._close_requested):
                raise FailedPrecondition("model is closed")
            self._users += 1

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._close_requested:
                self._free_locked()

    def _free_locked(self) -> None:
        # Under self._lock with no users, so no batch or `_predict_any` call is running, and
        # none can start. A single-row call on the hot path never takes self._lock: if one
        # holds the token in another thread, wait the microseconds it needs (it needs the GIL
        # to finish, hence a sleep, not a spin). Then keep the token, so that every later call
        # goes to `_predict_any`, which raises "model is closed". The C path reads the fast
        # config only with the GIL held, right before its call: the finalizer closes it first.
        self._freed = True
        while True:
            try:
                self._idle.pop()
                break
            except IndexError:
                time.sleep(_TOKEN_WAIT_S)
        self._finalizer()
