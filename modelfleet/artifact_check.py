"""Is this file a LightGBM model a worker can safely load? Decided before it enters the store.

LightGBM can crash (SIGSEGV, SIGFPE) or hang on text that parses but is inconsistent inside, and
a worker must never be the first to find out. So a new artifact is loaded and made to predict
(a row of zeros and a row of NaN) in a child process with a timeout; only then is it stored.
A registry keeps its child for the next artifact (`ArtifactChecker`); a bulk import checks in a
pool of them (`check_many`).
The store is content-addressed and sha256-verified on every read, so a checked artifact stays
checked. `read_header` gives the same facts cheaply for an artifact the store already holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from modelfleet.errors import FailedPrecondition
from modelfleet.processes import die_with_parent

CHECK_TIMEOUT_S = 60.0
IDLE_EXIT_S = 30.0  # a checker child with nothing to do exits after this long


@dataclass(frozen=True)
class ModelInfo:
    num_features: int
    num_classes: int
    objective: str
    # The digest of the very bytes a check loaded ("" from read_header): a file rewritten between
    # its hash and its check must not be stored under the hash as if checked.
    sha256: str = field(default="", compare=False)


def read_header(text: str | bytes, what: str = "model") -> ModelInfo:
    """num_features / num_classes / objective from a LightGBM text model's header lines.

    Only the text before the first tree is split into lines (and, given bytes, decoded): the
    header of a 4 MB model is a few hundred bytes, and the whole text took ~6 ms."""
    end = text.find(b"\nTree=" if isinstance(text, bytes) else "\nTree=")
    head = text[:end] if end >= 0 else text
    if isinstance(head, bytes):
        head = head.decode(errors="replace")
    header: dict[str, str] = {}
    for line in head.splitlines()[:64]:
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


class ArtifactChecker:
    """Checks artifacts in one child process kept for the next check.

    A child's start (Python, numpy, LightGBM) costs ~0.4 s and a check of a small model ~2 ms, so
    a registry that registers many models (a test fleet, `modelfleet up`) keeps one child instead
    of starting one per artifact. The isolation is the same: a crash or a hang kills only the
    child, that artifact is refused, and the next check starts a fresh one. The child exits by
    itself after IDLE_EXIT_S without work (it holds LightGBM's memory) and when this process goes.
    Thread-safe: checks take turns.
    """

    def __init__(self, timeout: float = CHECK_TIMEOUT_S, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.timeout = timeout
        self.idle_exit_s = idle_exit_s
        self.children_started = 0
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def check(self, path: Path) -> ModelInfo:
        """The model's facts; FailedPrecondition if it does not load and predict in the child."""
        with self._lock:
            for _ in range(2):  # a second child only if the first left before reading the path
                if self._child is not None and self._child.poll() is not None:
                    self._reap()  # it exited idle
                child = self._child or self._start()
                try:
                    child.stdin.write(json.dumps(str(path)).encode() + b"\n")
                    child.stdin.flush()
                except BrokenPipeError:
                    line = b""
                else:
                    line = self._read_line(child, path)
                if line:
                    reply = json.loads(line)
                    if "error" in reply:
                        raise FailedPrecondition(f"{path} is not a usable LightGBM model: {reply['error']}")
                    return ModelInfo(**reply["info"])
                returncode = self._reap()
                if returncode < 0:
                    name = signal.Signals(-returncode).name
                    raise FailedPrecondition(f"{path} is not a usable LightGBM model: loading it crashed "
                                             f"LightGBM ({name})")
            raise FailedPrecondition(f"{path} could not be checked: the checking process exited with {returncode}")

    def check_each(self, paths: list[Path],
                   on_done: "Callable[[int], None] | None" = None) -> dict[Path, ModelInfo | FailedPrecondition]:
        """Checks each path in turn, as `check_many` does in a pool: a usable model's facts, an
        unusable one's FailedPrecondition."""
        results: dict[Path, ModelInfo | FailedPrecondition] = {}
        for path in paths:
            try:
                results[path] = self.check(path)
            except FailedPrecondition as exc:
                results[path] = exc
            if on_done is not None:
                on_done(1)
        return results

    @property
    def child_pid(self) -> int | None:
        """The checking child's pid while it runs."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._child.stdin.close()  # the child's cue to exit
                try:
                    self._child.wait(5)
                except subprocess.TimeoutExpired:
                    self._child.kill()
                self._reap()

    def _start(self) -> subprocess.Popen:
        self._child = subprocess.Popen([sys.executable, "-m", "modelfleet.artifact_check", str(self.idle_exit_s)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.children_started += 1
        return self._child

    def _read_line(self, child: subprocess.Popen, path: Path) -> bytes:
        """The child's one-line reply, b"" if it exited first; kills it past the timeout."""
        deadline = time.monotonic() + self.timeout
        fd, data = child.stdout.fileno(), b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    child.kill()
                    self._reap()
                    raise FailedPrecondition(f"{path} is not a usable LightGBM model: loading it did not finish "
                                             f"within {self.timeout:g}s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    return b""
                data += chunk
        return data

    def _reap(self) -> int:
        child, self._child = self._child, None
        child.stdin.close()
        child.stdout.close()
        return child.wait()


def _serve(idle_exit_s: float = IDLE_EXIT_S) -> int:
    """The child: one JSON path per line in, one JSON reply per line out, until EOF or idle."""
    while select.select([sys.stdin], [], [], idle_exit_s)[0]:
        line = sys.stdin.buffer.readline()
        if not line:
            return 0
        try:
            outcome = _check_path(Path(json.loads(line)))
        except Exception as exc:  # noqa: BLE001 - whatever it is, that artifact is refused, not the child lost
            outcome = f"{type(exc).__name__}: {exc}"
        reply = {"info": outcome} if isinstance(outcome, dict) else {"error": outcome}
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.buffer.flush()
    return 0


def check_many(paths: list[Path], processes: int | None = None,
               on_done: "Callable[[int], None] | None" = None) -> dict[Path, ModelInfo | FailedPrecondition]:
    """Checks many new artifacts in a pool of child processes (bulk import).

    A model that crashes LightGBM takes its pool process down with it; the pool is then
    replaced by one ArtifactChecker that re-checks every unfinished path in turn (a fresh child
    after each crash), so one bad file costs one failure, not the import.
    """
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing as mp

    results: dict[Path, ModelInfo | FailedPrecondition] = {}
    pending = list(paths)
    if not pending:
        return results
    try:  # die_with_parent: the checkers go with an import killed even while they start
        with ProcessPoolExecutor(max_workers=processes or os.cpu_count() or 1, mp_context=mp.get_context("spawn"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            for path, outcome in zip(pending, pool.map(_check_path, pending, chunksize=64)):
                results[path] = ModelInfo(**outcome) if isinstance(outcome, dict) else FailedPrecondition(
                    f"{path} is not a usable LightGBM model: {outcome}")
                if on_done is not None:
                    on_done(1)
    except BrokenProcessPool:
        checker = ArtifactChecker()  # one child at a time: a crash costs its own artifact only
        try:
            results.update(checker.check_each([path for path in pending if path not in results], on_done))
        finally:
            checker.close()
    return results


def _check_path(path: Path) -> dict | str:
    """In a checker or pool process: the ModelInfo as a dict, or the reason it is not usable."""
    import numpy as np

    from modelfleet.errors import ModelfleetError
    from worker.predictor import LoadedModel

    try:
        data = Path(path).read_bytes()  # one read: what is hashed is what is loaded
        text = data.decode("utf-8")
        info = read_header(text, "it")  # the caller's message names the path
        model = LoadedModel.from_model_text(text)
        try:
            if (model.num_features, model.num_classes) != (info.num_features, info.num_classes):
                return (f"its header says {info.num_features} features x {info.num_classes} outputs, "
                        f"its trees {model.num_features} x {model.num_classes}")
            rows = np.vstack([np.zeros(model.num_features), np.full(model.num_features, np.nan)])
            model.predict(rows[0])  # the single-row path
            model.predict(rows[1])
            model.predict(rows.reshape(-1))  # the batch path
        finally:
            model.close()
        return {**asdict(info), "sha256": hashlib.sha256(data).hexdigest()}
    except (ModelfleetError, OSError, UnicodeDecodeError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":
    sys.exit(_serve(float(sys.argv[1]) if len(sys.argv) > 1 else IDLE_EXIT_S))
