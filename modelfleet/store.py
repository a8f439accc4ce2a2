"""The model store: immutable LightGBM artifacts, content-addressed by sha256.

An artifact lives at `{root}/sha256/{hh}/{sha256}.lgbm`. Registering copies a file in (atomic
rename, so a reader never sees half an artifact); a worker reads by the relative path recorded
in etcd and verifies the digest. Paths are built only from a validated hex digest, never from
tenant ids or versions, so nothing a caller sends can escape the root.

Backends sit behind one `Store` interface and are chosen by a URI (`open_store`):

    /srv/models, file:///srv/models   LocalStore: a directory on local disk or a shared mount
    s3://bucket/prefix                S3Store: S3 or any S3-compatible object store (store_s3.py)

Every backend keeps the same key layout under its root, so an artifact path recorded in etcd
means the same thing whichever backend serves it, and a store can be copied between backends
file for file. Invariant: an artifact's bytes never change once written (the path names their
digest), so re-putting is idempotent and a reader may cache by digest forever.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from modelfleet.config import FETCH_THREADS
from modelfleet.errors import Conflict, FailedPrecondition, InvalidArgument
from modelfleet.verified_files import VerifiedFiles
from modelfleet.whole_file import read_whole_file, read_whole_file_between_stats

TEMP_PREFIX = ".incoming-"  # a file being written, renamed into place when whole
STALE_TEMP_SECONDS = 3600.0  # older than this, no live writer still owns it


def remove_stale_temp_files(root: Path) -> None:
    """Removes `root/sha256/*/TEMP_PREFIX*` files left by writers that were killed mid-write."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for tmp in root.glob(f"sha256/*/{TEMP_PREFIX}*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except FileNotFoundError:
            pass

_ARTIFACT_RE = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{64})\.lgbm")

# Default byte bound of a worker's on-disk cache of downloaded artifacts (remote stores only).
DEFAULT_STORE_CACHE_BYTES = 4 << 30
# Environment variable naming the S3 endpoint (http(s)://host:port); unset means AWS itself.
S3_ENDPOINT_ENV = "MODELFLEET_S3_ENDPOINT"

_SPEC_HELP = "expected a directory, file://PATH or s3://BUCKET[/PREFIX]"


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


@dataclass(frozen=True)
class HashedBytes:
    """A file's bytes and their sha256, made by `of` (which computes it) or `read_expected`: what
    `Store.put` takes, so bytes already read and hashed are stored without reading them again,
    and always under their own digest."""
    data: bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> "HashedBytes":
        return cls(data, hashlib.sha256(data).hexdigest())


def read_expected(source: str | Path, sha256: str | None) -> HashedBytes:
    """The bytes of a file about to be stored, hashed. With `sha256` (the digest it had when it
    was hashed and checked), other bytes are Conflict and nothing is stored: a file rewritten after
    its check must not enter the store, where being stored means being checked."""
    content = HashedBytes.of(Path(source).read_bytes())
    if sha256 is not None and content.sha256 != sha256:
        raise changed_meanwhile(source)
    return content


def changed_meanwhile(source: str | Path) -> Conflict:
    """The error of a model file that is no longer the bytes hashed and checked a moment ago."""
    return Conflict(f"model file {str(source)!r} changed while it was being registered; register it again")


def artifact_for(sha256: str) -> str:
    """The relative artifact path of a digest: `sha256/<hh>/<sha256>.lgbm`."""
    return f"sha256/{sha256[:2]}/{sha256}.lgbm"


def validate_artifact(artifact: str) -> str:
    """Returns `artifact` unchanged when it is exactly `sha256/<hh>/<sha256>.lgbm`.

    Every backend builds paths and object keys only through this check, so nothing from etcd or
    a caller can name anything outside the store's root.
    """
    match = _ARTIFACT_RE.fullmatch(artifact) if isinstance(artifact, str) else None
    if match is None or match.group(1) != match.group(2)[:2]:
        raise InvalidArgument(f"invalid artifact path {artifact!r}: expected sha256/<hh>/<sha256>.lgbm")
    return artifact


@runtime_checkable
class Store(Protocol):
    """What every model store backend offers. Implementations are safe to share between threads.

    - `put(content)` stores bytes already read and hashed (`HashedBytes`) under their digest;
      idempotent: an intact stored copy is kept, a damaged one written again.
    - `put_file(source, sha256=None)` is `put(read_expected(source, sha256))`.
    - `read_verified(artifact, sha256, what)` returns bytes whose sha256 is `sha256`, or raises
      FailedPrecondition naming `what` (missing or corrupt), InvalidArgument (bad artifact path)
      or Unavailable (the store cannot be reached right now: retrying may help).
    - `read_local(artifact, sha256, what)` is `read_verified` without the network: the verified
      bytes if this machine holds them (a local directory, a remote store's disk cache), else
      None. A worker reads this way first, on threads a hung store never holds, and sends only
      the rest to `read_verified` on threads that may wait on the network (worker.model_cache).
    - `delete(artifact)` removes an artifact; True if it was there.
    - `exists(artifact)` says whether an artifact is stored (without verifying its bytes).
    - `uri` is the spec `open_store` accepts to open the same store again.
    """

    @property
    def uri(self) -> str: ...

    def put(self, content: HashedBytes) -> StoredArtifact: ...

    def put_file(self, source: str | Path, sha256: str | None = None) -> StoredArtifact: ...

    def read_verified(self, artifact: str, sha256: str, what: str) -> bytes: ...

    def read_local(self, artifact: str, sha256: str, what: str) -> bytes | None: ...

    def delete(self, artifact: str) -> bool: ...

    def exists(self, artifact: str) -> bool: ...

    def __repr__(self) -> str: ...


class LocalStore:
    """A directory on local disk (or a shared mount) holding artifacts."""

    def __init__(self, root: str | Path, verified: VerifiedFiles | None = None) -> None:
        """verified: which files were hashed already (modelfleet.verified_files), so that a
        reload of an unchanged artifact skips the hash; a fresh one by default."""
        self.root = Path(root).expanduser().resolve()
        self.verified = verified if verified is not None else VerifiedFiles()
        self._swept = False  # stale temp files, on the first write (readers, like workers, never sweep)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        """`file://` + the absolute root (percent-encoded; `open_store(store.uri)` reopens it)."""
        return self.root.as_uri()

    @staticmethod
    def artifact_for(sha256: str) -> str:
        return artifact_for(sha256)

    def _path(self, artifact: str) -> Path:
        return self.root / validate_artifact(artifact)

    def put_file(self, source: str | Path, sha256: str | None = None) -> StoredArtifact:
        """Copies source into the store; `sha256`: see `read_expected`."""
        return self.put(read_expected(source, sha256))

    def put(self, content: HashedBytes) -> StoredArtifact:
        """Writes the bytes under their digest (idempotent: an intact artifact with the same digest
        is kept; one damaged since it was stored is written again)."""
        data, sha = content.data, content.sha256
        artifact = self.artifact_for(sha)
        target = self._path(artifact)
        if not self._swept:
            remove_stale_temp_files(self.root)
            self._swept = True
        if not self._intact(artifact, data):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
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

    def _intact(self, artifact: str, data: bytes) -> bool:
        """Whether the artifact holds exactly `data`, whose digest names it: compared byte for
        byte, not hashed again (the caller's bytes are hashed; a compare costs ~1/10 of a hash)."""
        try:
            if self._path(artifact).stat().st_size != len(data):
                return False
            stored, _ = read_whole_file(self._path(artifact))
        except OSError:
            return False
        return stored == data

    def read_verified(self, artifact: str, sha256: str, what: str) -> bytes:
        """The artifact's bytes, or FailedPrecondition naming `what` when missing or corrupt.

        The bytes are hashed unless this very file (device and inode), unchanged, hashed to
        `sha256` before (`self.verified`)."""
        path = self._path(artifact)
        try:
            data, before, after = read_whole_file_between_stats(path)
        except FileNotFoundError:
            raise FailedPrecondition(f"{what}: artifact {artifact} is missing from the model store") from None
        except OSError as exc:
            raise FailedPrecondition(f"{what}: artifact {artifact} unreadable: {exc.strerror}") from None
        if self.verified.trusts(sha256, before, after):
            return data
        hashed_at = self.verified.clock_ns()
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise FailedPrecondition(
                f"{what}: artifact is corrupt (sha256 {got[:12]}..., expected {sha256[:12]}...)")
        self.verified.remember(sha256, before, after, hashed_at)
        return data

    def read_local(self, artifact: str, sha256: str, what: str) -> bytes:
        """`read_verified`: a directory counts as local (a network mount's reads wait on a load
        thread, as they always have)."""
        return self.read_verified(artifact, sha256, what)

    def delete(self, artifact: str) -> bool:
        """Removes the artifact; True if it existed. Callers make sure no version still names it."""
        path = self._path(artifact)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def exists(self, artifact: str) -> bool:
        return self._path(artifact).is_file()


# -- choosing a backend by URI ----------------------------------------------------------------

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# S3 bucket naming rules (the subset valid in every region and for path-style addressing).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")
# One prefix segment: AWS's "safe" key characters plus '='.
_PREFIX_SEGMENT_RE = re.compile(r"[A-Za-z0-9!_.*'()=-]+")


def open_store(spec: str, cache_dir: str | Path | None = None,
               cache_bytes: int = DEFAULT_STORE_CACHE_BYTES, *,
               endpoint_url: str | None = None, connections: int = FETCH_THREADS.default) -> Store:
    """Opens the model store that `spec` names.

    - `/path/to/dir`, `relative/dir` or `file:///path/to/dir` -> LocalStore (cache ignored).
    - `s3://bucket` or `s3://bucket/some/prefix` -> S3Store. The endpoint is `endpoint_url`, else
      $MODELFLEET_S3_ENDPOINT (an S3-compatible server, e.g. http://127.0.0.1:9000), else AWS.
      Credentials and region come from boto3's usual chain (AWS_ACCESS_KEY_ID,
      AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, profiles, instance roles).
      Downloads are cached in `cache_dir`, bounded to `cache_bytes` (no disk cache when
      cache_dir is None or cache_bytes is 0). `connections`: the S3 client's connection pool; a
      worker passes its --fetch-threads, so each of its fetch threads has a connection.

    Anything else raises InvalidArgument saying what was expected.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"model store is empty: {_SPEC_HELP}")
    spec = spec.strip()
    if "\x00" in spec:
        raise InvalidArgument(f"model store {spec!r} contains a NUL byte: {_SPEC_HELP}")
    match = _SCHEME_RE.match(spec)
    if match is None:
        lowered = spec.lower()
        if lowered.startswith(("s3:", "file:")):
            raise InvalidArgument(f"model store {spec!r} looks like a malformed URI: {_SPEC_HELP}")
        return LocalStore(spec)
    scheme = match.group(1).lower()
    rest = spec[match.end():]
    if scheme == "file":
        return LocalStore(_file_uri_path(spec, rest))
    if scheme == "s3":
        bucket, prefix = _parse_s3(spec, rest)
        endpoint = _endpoint(endpoint_url if endpoint_url is not None else os.environ.get(S3_ENDPOINT_ENV))
        if cache_bytes is None or cache_bytes < 0:
            raise InvalidArgument(f"store cache size must be >= 0 bytes, got {cache_bytes!r}")
        from modelfleet.store_cache import DiskCache  # noqa: PLC0415 (keeps boto3 off LocalStore's path)
        from modelfleet.store_s3 import S3Store  # noqa: PLC0415

        try:
            cache = DiskCache(cache_dir, cache_bytes) if cache_dir is not None and cache_bytes > 0 else None
        except OSError as exc:
            raise FailedPrecondition(f"cannot use {cache_dir} as the store's disk cache (--store-cache-dir, "
                                     f"MODELFLEET_STORE_CACHE_DIR; '' for none): {exc.strerror}") from None
        return S3Store(bucket, prefix, endpoint_url=endpoint, cache=cache, max_pool_connections=connections)
    raise InvalidArgument(f"unsupported model store scheme {scheme + '://'!r} in {spec!r}: {_SPEC_HELP}")


def _file_uri_path(spec: str, rest: str) -> str:
    parts = urlsplit("file://" + rest)
    if parts.query or parts.fragment:
        raise InvalidArgument(f"model store {spec!r}: a file:// URI takes no query or fragment")
    if parts.netloc not in ("", "localhost"):
        raise InvalidArgument(f"model store {spec!r}: file:// URIs name a local path "
                              f"(file:///abs/path), not host {parts.netloc!r}")
    path = unquote(parts.path)
    if not path:
        raise InvalidArgument(f"model store {spec!r} names no directory: {_SPEC_HELP}")
    return path


def _parse_s3(spec: str, rest: str) -> tuple[str, str]:
    if any(ch in rest for ch in "?#\\ "):
        raise InvalidArgument(f"model store {spec!r}: an s3:// URI is s3://BUCKET[/PREFIX], "
                              "without query, fragment, spaces or backslashes")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket or _IPV4_RE.fullmatch(bucket):
        raise InvalidArgument(f"model store {spec!r}: {bucket!r} is not a valid S3 bucket name "
                              "(3-63 characters: lowercase letters, digits, '.', '-')")
    prefix = prefix.strip("/")
    if prefix:
        for segment in prefix.split("/"):
            if segment in ("", ".", "..") or not _PREFIX_SEGMENT_RE.fullmatch(segment):
                raise InvalidArgument(f"model store {spec!r}: bad key prefix {prefix!r} (segments of "
                                      "letters, digits and !_.*'()=-, no empty, '.' or '..' segments)")
    return bucket, prefix


def _endpoint(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidArgument(f"S3 endpoint {raw!r} (${S3_ENDPOINT_ENV}) must look like "
                              "http(s)://host[:port]")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise InvalidArgument(f"S3 endpoint {raw!r} (${S3_ENDPOINT_ENV}) has a bad port") from None
    return raw.rstrip("/")
