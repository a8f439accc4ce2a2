"""Which artifact files were hashed already and have not changed since, so a reload skips the hash.

Why: a worker verifies an artifact's sha256 before parsing it, and with a cache smaller than its
working set it reloads the same artifacts again and again. Hashing a 318 KB model costs ~0.2 ms,
~12 % of a load and ~5 % of a worker's CPU in the benchmark's zipf10k mix (`perf`, libcrypto).
Artifacts are immutable (the path names the digest), so once a file's bytes have been hashed,
the same file with the same metadata has the same bytes: the check of git's index, rsync's
quick check and make.

A file's identity is (device, inode, size, mtime, ctime). Every way to change a file's bytes
changes one of them: a replacement (rename over it) is a new inode; a write in place moves
mtime and ctime, and nobody can set ctime back (`touch -d` sets mtime, and moves ctime).

Invariants:
- a file is trusted only if its identity before the read, after the read and when it was
  hashed are equal, so bytes written while they were being read are hashed again;
- a file is remembered only if its ctime lies at least `settle_s` before the hash began
  ("racy" files, as git calls them): timestamps come from a coarse kernel clock, so a write in
  the same tick as the one before the hash could leave the identity unchanged; a write that
  comes after a settled hash gets a later ctime;
- at most `capacity` files are remembered (least recently used go first): ~0.3 KB each.

What this gives up: corruption that changes no metadata (a failing disk under a file no process
wrote) is caught when the file's pages are next read from the disk, not the page cache, only if
the filesystem checksums them. Artifacts are checked whole on their first load in each process,
and every time their metadata changes.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable

DEFAULT_CAPACITY = 10_000  # ~0.3 KB each: ~3 MB at most
DEFAULT_SETTLE_S = 1.0
_IDENTITY = struct.Struct("<5q")  # 40 bytes instead of a tuple of five ints (~200)


def file_identity(st: os.stat_result) -> bytes:
    """(device, inode, size, mtime, ctime), packed."""
    return _IDENTITY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """Files whose bytes hashed to a digest, by that digest: a file is remembered under the
    digest its bytes have, so a caller expecting another digest never finds it trusted.

    Thread-safe: a worker's load threads share one."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, settle_s: float = DEFAULT_SETTLE_S,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        """clock_ns: the wall clock that ctimes are compared with (tests move it)."""
        self._known: OrderedDict[str, bytes] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self._settle_ns = int(settle_s * 1e9)
        self.clock_ns = clock_ns
        self.trusted = 0  # reads that skipped the hash
        self.hashed = 0  # reads whose bytes were hashed

    def trusts(self, digest: str, before: os.stat_result, after: os.stat_result) -> bool:
        """True when the bytes read between the fstats `before` and `after` are those of a file
        that hashed to `digest` and has not changed since."""
        identity = file_identity(before)
        with self._lock:
            if identity != file_identity(after) or self._known.get(digest) != identity:
                self.hashed += 1  # the caller hashes them now
                return False
            self._known.move_to_end(digest)
            self.trusted += 1
        return True

    def remember(self, digest: str, before: os.stat_result, after: os.stat_result, hashed_at_ns: int) -> None:
        """Records that the bytes read between `before` and `after`, hashed at `hashed_at_ns`
        (`clock_ns()` before the hash), are `digest`'s, unless the file changed during the read
        or its ctime is too recent to rule out another write within the same tick."""
        identity = file_identity(before)
        if identity != file_identity(after) or before.st_ctime_ns > hashed_at_ns - self._settle_ns:
            return
        with self._lock:
            self._known[digest] = identity
            self._known.move_to_end(digest)
            while len(self._known) > self._capacity:
                self._known.popitem(last=False)

    def __len__(self) -> int:
        return len(self._known)
