"""The model store: immutable LightGBM artifacts, content-addressed by sha256.

An artifact lives at `{root}/sha256/{hh}/{sha256}.lgbm`. Registering copies a file in (atomic
rename, so a reader never sees half an artifact); a worker reads by the relative path recorded
in etcd and verifies the digest. Paths are built only from a validated hex digest, never from
tenant ids or versions, so nothing a caller sends can escape the root.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelfleet.errors import FailedPrecondition, InvalidArgument

_ARTIFACT_RE = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{64})\.lgbm")


@dataclass(frozen=True)
class StoredArtifact:
    artifact: str  # path relative to the store root
    sha256: str
    size: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LocalStore:
    """A directory on local disk (or a shared mount) holding artifacts."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @staticmethod
    def artifact_for(sha256: str) -> str:
        return f"sha256/{sha256[:2]}/{sha256}.lgbm"

    def _path(self, artifact: str) -> Path:
        match = _ARTIFACT_RE.fullmatch(artifact)
        if match is None or match.group(1) != match.group(2)[:2]:
            raise InvalidArgument(f"invalid artifact path {artifact!r}: expected sha256/<hh>/<sha256>.lgbm")
        return self.root / artifact

    def put_file(self, source: str | Path) -> StoredArtifact:
        """Copies source into the store (idempotent: an artifact with the same digest is kept)."""
        source = Path(source)
        data = source.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        artifact = self.artifact_for(sha)
        target = self._path(artifact)
        if not (target.is_file() and target.stat().st_size == len(data)):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return StoredArtifact(artifact=artifact, sha256=sha, size=len(data))

    def read_verified(self, artifact: str, sha256: str, what: str) -> bytes:
        """The artifact's bytes, or FailedPrecondition naming `what` when missing or corrupt."""
        path = self._path(artifact)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FailedPrecondition(f"{what}: artifact {artifact} is missing from the model store") from None
        except OSError as exc:
            raise FailedPrecondition(f"{what}: artifact {artifact} unreadable: {exc.strerror}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise FailedPrecondition(
                f"{what}: artifact is corrupt (sha256 {got[:12]}..., expected {sha256[:12]}...)")
        return data
