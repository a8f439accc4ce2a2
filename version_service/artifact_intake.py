"""Taking model files into the store: the one hash -> check -> store sequence of register and import.

Being stored means being checked: a later register or import of the same bytes skips the check,
and workers load what the store holds. So the store must get only bytes that were hashed and
checked, whichever command brings them. For each file:

1. hash: it is read once and hashed; the digest names its artifact. If that artifact is stored,
   these bytes were checked when it was: their facts come from their header, and the store keeps
   its copy, or repairs a damaged one from these same bytes (not read again).
2. check: a new file is loaded and made to predict in a child process (`Check`), which reports
   the digest of the bytes it loaded: another digest means the file was rewritten after step 1.
3. store: `put_file(source, sha256=)` reads the file again and stores it only if it still holds
   those bytes, so a rewrite after the check is refused too.

A rewrite at either point is `store.changed_meanwhile` (Conflict) for that file, and nothing of it
is stored. The three reads of a new file are each needed: the first to know whether it is stored
(which skips the child), the child's to check what it hashes, the last to see the file after the
check. A stored file is read once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from modelfleet import failpoints
from modelfleet.artifact_check import ModelInfo, read_header
from modelfleet.errors import Conflict, FailedPrecondition, InvalidArgument, ModelfleetError
from modelfleet.store import Store, artifact_for, changed_meanwhile, read_expected
from version_service.schema import VersionRecord, utc_stamp

Progress = Callable[[str, int, int], None]  # (phase, done, total): phases "hashing" and "checking"


class Check(Protocol):
    """Checks new model files (artifact_check.check_many, ArtifactChecker.check_each)."""

    def __call__(self, paths: list[Path], *, on_done: Callable[[int], None] | None = None
                 ) -> dict[Path, ModelInfo | FailedPrecondition]: ...


@dataclass(frozen=True)
class TakenIn:
    """A model file whose hashed and checked bytes are in the store."""
    source: Path
    artifact: str
    sha256: str
    size: int
    info: ModelInfo
    new: bool  # checked now (its artifact was not stored)

    def record(self, version: str) -> VersionRecord:
        """The version record of this model as `version`, created now."""
        return VersionRecord(version=version, artifact=self.artifact, sha256=self.sha256,
                             num_features=self.info.num_features, num_classes=self.info.num_classes,
                             bytes=self.size, objective=self.info.objective, created=utc_stamp())

    def restore(self, store: Store) -> None:
        """Stores it again if it has gone (a collection deleted it: version_service.collection_guard),
        from the file, only if that still holds the bytes that were checked (else Conflict)."""
        if not store.exists(self.artifact):
            store.put_file(self.source, sha256=self.sha256)


def take_in(store: Store, sources: Sequence[Path], check: Check, *, before_store: str,
            before_check: str | None = None, on_progress: Progress | None = None
            ) -> dict[Path, TakenIn | ModelfleetError]:
    """Each distinct source: taken in, or why not (InvalidArgument: unreadable; FailedPrecondition:
    not a usable model; Conflict: rewritten meanwhile). Unreadable and stored sources come first,
    in order, then the new ones. `before_check` and `before_store` name the failpoints (tests) held
    after the hashes and after the checks."""
    progress = on_progress or (lambda phase, done, total: None)
    sources = list(dict.fromkeys(sources))
    outcomes: dict[Path, TakenIn | ModelfleetError] = {}
    hashed: dict[Path, str] = {}  # new source -> the digest of the bytes read
    for n, source in enumerate(sources, 1):
        outcome = _hashed(store, source)
        if isinstance(outcome, str):
            hashed[source] = outcome
        else:
            outcomes[source] = outcome
        progress("hashing", n, len(sources))
    if not hashed:
        return outcomes
    if before_check:
        failpoints.pause(before_check)  # hashed, not yet checked
    checked = 0

    def one_checked(_: int) -> None:
        nonlocal checked
        checked += 1
        progress("checking", checked, len(hashed))

    checks = check(list(hashed), on_done=one_checked)
    failpoints.pause(before_store)  # checked, not yet stored: where a rewrite matters
    for source, sha256 in hashed.items():
        info = checks[source]
        if isinstance(info, FailedPrecondition):
            outcomes[source] = info
        elif info.sha256 != sha256:  # rewritten between the hash and the check
            outcomes[source] = changed_meanwhile(source)
        else:
            try:
                stored = store.put_file(source, sha256=sha256)
            except Conflict as exc:  # rewritten since the check
                outcomes[source] = exc
            else:
                outcomes[source] = TakenIn(source, stored.artifact, sha256, stored.size, info, new=True)
    return outcomes


def _hashed(store: Store, source: Path) -> TakenIn | ModelfleetError | str:
    """Step 1 for one file: taken in if its artifact is stored, else the digest of the bytes read,
    to check. Its bytes are let go on return: an import holds thousands of files."""
    try:
        content = read_expected(source, None)
    except OSError as exc:
        return InvalidArgument(f"{source}: {exc.strerror}")
    artifact = artifact_for(content.sha256)
    if not store.exists(artifact):
        return content.sha256
    try:
        info = read_header(content.data, str(source))
    except FailedPrecondition as exc:
        return exc
    store.put(content)  # a no-op unless the stored copy was damaged since
    return TakenIn(source, artifact, content.sha256, len(content.data), info, new=False)
