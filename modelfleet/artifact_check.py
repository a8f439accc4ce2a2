"""Is this file a LightGBM model a worker can safely load? Decided before it enters the store.

LightGBM can crash (SIGSEGV, SIGFPE) or hang on text that parses but is inconsistent inside, and
a worker must never be the first to find out. So a new artifact is loaded and made to predict
(a row of zeros and a row of NaN) in a child process with a timeout; only then is it stored.
The store is content-addressed and sha256-verified on every read, so a checked artifact stays
checked. `read_header` gives the same facts cheaply for an artifact the store already holds.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from modelfleet.errors import FailedPrecondition

CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ModelInfo:
    num_features: int
    num_classes: int
    objective: str


def read_header(text: str, what: str = "model") -> ModelInfo:
    """num_features / num_classes / objective from a LightGBM text model's header lines."""
    header: dict[str, str] = {}
    for line in text.splitlines()[:64]:
        if line.startswith("Tree="):
            break
        key, sep, value = line.partition("=")
        if sep:
            header[key] = value.strip()
    try:
        return ModelInfo(num_features=int(header["max_feature_idx"]) + 1,
                         num_classes=int(header.get("num_class", "1")),
                         objective=header.get("objective", "").split(" ")[0])
    except (KeyError, ValueError):
        raise FailedPrecondition(f"{what} is not a LightGBM text model (no max_feature_idx in its header)") from None


def check_in_child(path: Path, timeout: float = CHECK_TIMEOUT_S) -> ModelInfo:
    """Loads and predicts with the model in a child process; FailedPrecondition if that fails."""
    try:
        done = subprocess.run([sys.executable, "-m", "modelfleet.artifact_check", str(path)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{path} is not a usable LightGBM model: loading it did not finish "
                                 f"within {timeout:.0f}s") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise FailedPrecondition(f"{path} is not a usable LightGBM model: loading it crashed LightGBM ({name})")
    if done.returncode != 0:
        reason = (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise FailedPrecondition(f"{path} is not a usable LightGBM model: {reason}")
    return ModelInfo(**json.loads(done.stdout))


def _check(path: str) -> int:
    import numpy as np

    from modelfleet.errors import ModelfleetError
    from worker.predictor import LoadedModel

    try:
        text = Path(path).read_text()
        info = read_header(text, path)
        model = LoadedModel.from_model_text(text)
        if (model.num_features, model.num_classes) != (info.num_features, info.num_classes):
            print(f"header says {info.num_features} features x {info.num_classes} outputs, "
                  f"the booster {model.num_features} x {model.num_classes}")
            return 1
        rows = np.vstack([np.zeros(model.num_features), np.full(model.num_features, np.nan)])
        model.predict(rows[0])
        model.predict(rows.reshape(-1))
        model.close()
    except (ModelfleetError, OSError, UnicodeDecodeError) as exc:
        print(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1
    print(json.dumps(asdict(info)))
    return 0


if __name__ == "__main__":
    sys.exit(_check(sys.argv[1]))


def check_many(paths: list[Path], processes: int | None = None,
               on_done: "Callable[[int], None] | None" = None) -> dict[Path, ModelInfo | FailedPrecondition]:
    """Checks many new artifacts in a pool of child processes (bulk import).

    A model that crashes LightGBM takes its pool process down with it; the pool is then
    rebuilt and every unfinished path is re-checked alone in its own child, so one bad file
    costs one failure, not the import.
    """
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing as mp
    import os

    results: dict[Path, ModelInfo | FailedPrecondition] = {}
    pending = list(paths)
    if not pending:
        return results
    try:
        with ProcessPoolExecutor(max_workers=processes or os.cpu_count() or 1,
                                 mp_context=mp.get_context("spawn")) as pool:
            for path, outcome in zip(pending, pool.map(_check_path, pending, chunksize=64)):
                results[path] = ModelInfo(**outcome) if isinstance(outcome, dict) else FailedPrecondition(
                    f"{path} is not a usable LightGBM model: {outcome}")
                if on_done is not None:
                    on_done(1)
    except BrokenProcessPool:
        for path in pending:
            if path not in results:
                try:
                    results[path] = check_in_child(path)
                except FailedPrecondition as exc:
                    results[path] = exc
                if on_done is not None:
                    on_done(1)
    return results


def _check_path(path: Path) -> dict | str:
    """In a pool process: the ModelInfo as a dict, or the reason it is not usable."""
    import numpy as np

    from modelfleet.errors import ModelfleetError
    from worker.predictor import LoadedModel

    try:
        text = Path(path).read_text()
        info = read_header(text, str(path))
        model = LoadedModel.from_model_text(text)
        try:
            if (model.num_features, model.num_classes) != (info.num_features, info.num_classes):
                return "its header disagrees with its trees"
            model.predict(np.zeros(model.num_features))
            model.predict(np.full(model.num_features, np.nan))
        finally:
            model.close()
        return asdict(info)
    except (ModelfleetError, OSError, UnicodeDecodeError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
