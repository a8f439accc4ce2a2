"""A worker's on-disk cache of downloaded artifacts, keyed by sha256 and bounded in bytes.

Layout: `{dir}/sha256/{hh}/{sha256}.lgbm`, the same as a LocalStore, so a cache directory can
be inspected (or even served) like one. Invariants:

- A hit is always verified: `get` returns bytes whose sha256 is the key, or None. A corrupt
  or truncated file (a crash mid-write without fsync, a bad disk, a meddling hand) is deleted
  and reported as a miss, so the caller downloads it again.
- Writes are atomic (temp file in the same directory, then rename): a reader sees the whole
  file or none of it.
- After every `put` the files under the cache total at most `max_bytes`; the least recently
  used (oldest mtime: every hit and write stamps the file's mtime) are evicted first. A file
  bigger than the whole budget is not cached at all.
- Safe to share between threads. Several processes may share one directory: eviction reads
  the directory, not an in-memory index, and a file deleted under a reader is just a miss.

Content addressing makes the cache safe to share between stores: equal digests, equal bytes.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from modelfleet.store import TEMP_PREFIX, remove_stale_temp_files
from modelfleet.whole_file import read_whole_file

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_FILE_RE = re.compile(r"([0-9a-f]{64})\.lgbm")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # cached files that failed verification and were deleted
    writes: int = 0
    evictions: int = 0


class DiskCache:
    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.directory = Path(directory).expanduser().resolve()
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._last_stamp = 0
        (self.directory / "sha256").mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.directory)

    def __repr__(self) -> str:
        return f"DiskCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def path_for(self, sha256: str) -> Path:
        """The cache file of a digest (validated: only a 64-hex digest ever builds a path)."""
        if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
            raise ValueError(f"cache key must be a lowercase hex sha256, got {sha256!r}")
        return self.directory / "sha256" / sha256[:2] / f"{sha256}.lgbm"

    def __contains__(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes of `sha256`, verified, or None (missing or corrupt, now deleted)."""
        path = self.path_for(sha256)
        try:
            data, stat = read_whole_file(path)
            identity = _identity(stat)
        except OSError:  # missing, evicted under us, unreadable: all a miss
            with self._lock:
                self.stats.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            with self._lock:
                self.stats.misses += 1
                self.stats.corrupt += 1
                # Delete only the file we read: another thread may have replaced it already.
                try:
                    if _identity(os.stat(path)) == identity:
                        path.unlink()
                except FileNotFoundError:
                    pass
            return None
        with self._lock:
            self.stats.hits += 1
            self._touch(path)
        return data

    def put(self, sha256: str, data: bytes, *, verified: bool = False) -> bool:
        """Caches `data` under its digest and evicts down to the budget; False if too big to cache.
        `verified`: the caller hashed `data` to `sha256` just now (a download it checked), so it
        is not hashed again; otherwise bytes that do not hash to `sha256` are refused."""
        path = self.path_for(sha256)
        if not verified and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"data does not hash to {sha256[:12]}...: refusing to cache it")
        if len(data) > self.max_bytes:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        try:
            # No fsync: a file torn by a crash fails verification on its next read and is refetched.
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            with self._lock:
                os.replace(tmp, path)
                self.stats.writes += 1
                self._touch(path)
                self._evict(keep=path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def discard(self, sha256: str) -> bool:
        """Drops a cached file; True if there was one."""
        path = self.path_for(sha256)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    def total_bytes(self) -> int:
        """Bytes held by cached artifacts now (temp files of in-flight writes not counted)."""
        return sum(size for _, size, _ in self._entries())

    # -- internals (call with the lock held where noted) ---------------------------------------

    def _touch(self, path: Path) -> None:
        """Stamps `path` as just used (lock held). Stamps strictly increase within a process, so
        LRU order holds even when the filesystem clock is coarser than the calls."""
        stamp = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        try:
            os.utime(path, ns=(stamp, stamp))
        except FileNotFoundError:
            pass

    def _entries(self) -> list[tuple[int, int, Path]]:
        """(mtime_ns, size, path) of every cached artifact file."""
        entries = []
        try:
            shards = list(os.scandir(self.directory / "sha256"))
        except FileNotFoundError:
            return entries
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in files:
                if not _FILE_RE.fullmatch(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        return entries

    def _evict(self, keep: Path) -> None:
        """Deletes least recently used files until the total fits the budget (lock held)."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        for _, size, path in sorted(entries, key=lambda e: (e[0], str(e[2]))):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            else:
                self.stats.evictions += 1
            total -= size


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
