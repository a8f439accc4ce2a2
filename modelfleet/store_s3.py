"""S3Store: the model store in S3 or any S3-compatible object store (MinIO, Ceph RGW, R2, ...).

Objects live at `{prefix}/sha256/{hh}/{sha256}.lgbm`, the LocalStore layout under a key prefix.
Keys are built only from a validated artifact path (`validate_artifact`), never from tenant ids.

- put_file HEADs the key first and skips the upload when an object of that size and digest is
  already there (immutable, content-addressed: re-putting is idempotent); otherwise it uploads
  with the sha256 in the object's metadata and Content-MD5 so the server rejects a body damaged
  in transit.
- read_local serves from the local DiskCache when it holds a verified copy (no network: a worker
  reads this way on threads a hung store never holds); read_verified does too, else downloads,
  verifies the sha256 and caches. Loads of one artifact at once share its download and its hash
  (`_download_once`): each compares the one digest with the one it expects before it uses the
  bytes. A wrong digest or a missing object is FailedPrecondition naming `what`; a store that
  cannot be reached (connection refused, timeouts, 5xx after retries) is Unavailable; wrong
  credentials or permissions are FailedPrecondition.

Request checksums are sent only when an operation requires them ("when_required"): several
S3-compatible servers reject the CRC headers newer botocore sends by default, and integrity is
already covered by Content-MD5 on upload and our own sha256 check on download.
"""
from __future__ import annotations

import base64
import hashlib
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from modelfleet.config import FETCH_THREADS
from modelfleet.errors import FailedPrecondition, ModelfleetError, Unavailable
from modelfleet.store import HashedBytes, StoredArtifact, artifact_for, read_expected, validate_artifact
from modelfleet.store_cache import DiskCache

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem",
                           "ExpiredToken", "InvalidToken"})
_RETRYABLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                              "ServiceUnavailable", "InternalError", "503", "500"})

_LOADER = botocore.loaders.create_loader()  # caches parsed service models; safe to share
# A store that accepts connections and then says nothing must fail a load in seconds, not minutes
# (a load holds one of a worker's few load threads meanwhile): artifacts are KB to a few MB, and a
# healthy S3 never pauses 5 s between bytes. Worst case per read: 2 x (2 + 5) s.
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 2


class S3Store:
    """Artifacts in `s3://{bucket}/{prefix}`. Thread-safe (one boto3 client, shared)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 cache: DiskCache | None = None, region_name: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S,
                 max_attempts: int = MAX_ATTEMPTS, max_pool_connections: int = FETCH_THREADS.default) -> None:
        """max_pool_connections: downloads at once without waiting for a connection; a worker makes
        it its --fetch-threads."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.cache = cache
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_pool_connections,
            # Path-style works with every S3-compatible server and with IP endpoints.
            s3={"addressing_style": "path"} if endpoint_url else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A private session (boto3's default session is not thread-safe; clients are), sharing
        # one loader of botocore's service data: a new client then costs ~30 ms, not ~300.
        core = botocore.session.Session()
        core.register_component("data_loader", _LOADER)
        self._session = boto3.session.Session(botocore_session=core, region_name=region_name)
        self.client = self._session.client("s3", endpoint_url=endpoint_url, config=config)
        self._lock = threading.Lock()
        self._downloading: dict[str, Future] = {}  # key -> the GET in flight (_download_once)
        self.downloads = 0  # GETs that fetched an artifact (cache misses), for stats and tests

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store({self.uri!r}{where}, cache={self.cache!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key_for(self, artifact: str) -> str:
        artifact = validate_artifact(artifact)
        return f"{self.prefix}/{artifact}" if self.prefix else artifact

    # -- the Store interface ------------------------------------------------------------------

    def put_file(self, source: str | Path, sha256: str | None = None) -> StoredArtifact:
        """Uploads source; `sha256`: see modelfleet.store.read_expected."""
        return self.put(read_expected(source, sha256))

    def put(self, content: HashedBytes) -> StoredArtifact:
        """Uploads the bytes under their digest; a no-op when the object is already stored intact
        (its size and the sha256 in its metadata, which only this code writes: an object put there
        by anything else is written again)."""
        data, sha = content.data, content.sha256
        artifact = artifact_for(sha)
        key = self.key_for(artifact)
        head = self._head(key, f"storing {artifact}", tolerate_denied=True)
        if head is not None and head.get("ContentLength") == len(data) and \
                head.get("Metadata", {}).get("sha256") == sha:
            return StoredArtifact(artifact=artifact, sha256=sha, size=len(data))
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5,
                                   ContentType="text/plain; charset=utf-8",
                                   Metadata={"sha256": sha})
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"storing artifact {artifact}") from None
        return StoredArtifact(artifact=artifact, sha256=sha, size=len(data))

    def read_local(self, artifact: str, sha256: str, what: str) -> bytes | None:
        """The artifact's verified bytes from the disk cache, or None: they must be downloaded."""
        self.key_for(artifact)  # validated as if it were read
        if self.cache is None or not _is_hex_sha(sha256):
            return None
        return self.cache.get(sha256)

    def read_verified(self, artifact: str, sha256: str, what: str) -> bytes:
        """The artifact's verified bytes (from the disk cache when it has them)."""
        data = self.read_local(artifact, sha256, what)
        if data is not None:
            return data
        try:
            data, got, downloaded = self._download_once(self.key_for(artifact))
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise FailedPrecondition(
                    f"{what}: artifact {artifact} is missing from the model store {self.uri}") from None
            raise self._translate(exc, f"reading artifact {artifact}", what) from None
        except BotoCoreError as exc:
            raise self._translate(exc, f"reading artifact {artifact}", what) from None
        if got != sha256:
            raise FailedPrecondition(
                f"{what}: artifact is corrupt (sha256 {got[:12]}..., expected {sha256[:12]}...)")
        if downloaded and self.cache is not None and _is_hex_sha(sha256):
            try:
                self.cache.put(sha256, data, verified=True)  # just hashed: not hashed again
            except OSError:
                pass  # a full or read-only cache disk must not fail a load; the next read refetches
        return data

    def delete(self, artifact: str) -> bool:
        """Deletes the object (and any cached copy); True if it existed."""
        key = self.key_for(artifact)
        existed = self._head(key, f"deleting {artifact}") is not None
        if existed:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise self._translate(exc, f"deleting artifact {artifact}") from None
        if self.cache is not None:
            self.cache.discard(artifact.rsplit("/", 1)[1].removesuffix(".lgbm"))
        return existed

    def exists(self, artifact: str) -> bool:
        return self._head(self.key_for(artifact), f"looking up {artifact}") is not None

    # -- internals ------------------------------------------------------------------------------

    def _download_once(self, key: str) -> tuple[bytes, str, bool]:
        """(the object's bytes, their sha256, whether this call downloaded them): one GET per key
        at a time, its outcome shared by every thread that asks meanwhile. Tenants often share an
        artifact (one model for many, fleets from templates), and their cold loads come together:
        without this, one GET per load thread for the same bytes. The download hashes the bytes
        once for all of them (each caller compares the digest with the one it expects). Raises
        what the GET raised; each caller words it for its own tenant."""
        with self._lock:
            pending = self._downloading.get(key)
            if pending is None:
                pending = self._downloading[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return *pending.result(), False
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            digest = hashlib.sha256(data).hexdigest()
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result((data, digest))
            with self._lock:
                self.downloads += 1
            return data, digest, True
        finally:
            with self._lock:
                del self._downloading[key]

    def _head(self, key: str, doing: str, tolerate_denied: bool = False) -> dict[str, Any] | None:
        """HEAD of `key`, or None when there is no such object."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = _code(exc)
            if code in _MISSING_CODES:
                return None
            if tolerate_denied and code in _DENIED_CODES:
                # Without s3:ListBucket, S3 answers 403 for a missing key: try the write instead.
                return None
            raise self._translate(exc, doing) from None
        except BotoCoreError as exc:
            raise self._translate(exc, doing) from None

    def _translate(self, exc: Exception, doing: str, what: str | None = None) -> ModelfleetError:
        """A botocore failure as the modelfleet error a caller should see."""
        lead = f"{what}: " if what else ""
        where = f"model store {self.uri}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return FailedPrecondition(f"{lead}{where}: no usable S3 credentials while {doing} "
                                      "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile/role)")
        if isinstance(exc, ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            message = exc.response.get("Error", {}).get("Message") or code
            if code == "NoSuchBucket":
                return FailedPrecondition(f"{lead}{where}: bucket {self.bucket!r} does not exist")
            if code in _DENIED_CODES or status == 403:
                return FailedPrecondition(
                    f"{lead}{where}: access denied while {doing} ({code}: {message}); check the "
                    "credentials and that they may read/write this bucket and prefix (without "
                    "s3:ListBucket, S3 reports a missing object as AccessDenied)")
            if code in _RETRYABLE_CODES or status >= 500:
                return Unavailable(f"{lead}{where} failed while {doing}: {code} (HTTP {status}): {message}")
            return FailedPrecondition(f"{lead}{where} refused {doing}: {code} (HTTP {status}): {message}")
        # Connection refused, DNS failure, timeouts, a connection dropped mid-body, ...
        return Unavailable(f"{lead}{where} is unreachable while {doing}: {exc}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_hex_sha(value: str) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
