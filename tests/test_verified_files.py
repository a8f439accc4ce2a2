"""A local store hashes an artifact once, and again whenever the file may have changed.

Real files on the real filesystem: a rewrite in place, a rewrite with its mtime put back, a
replacement by rename, a file written in the same clock tick as its hash, a write during a read.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from modelfleet.demo_models import train_model_text
from modelfleet.errors import FailedPrecondition
from modelfleet.store import LocalStore
from modelfleet.verified_files import VerifiedFiles

WHAT = "tenant 'acme' version 'v1'"


def settled_clock() -> int:
    """A clock 10 s ahead: every file on disk looks settled (older than any tick)."""
    return time.time_ns() + 10_000_000_000


def ctime_moves_past(path: Path, rewrite, deadline_s: float = 5.0) -> None:
    """Rewrites `path` (with `rewrite`) until its ctime differs from now's: a write lands in a
    later tick of the kernel's coarse clock, as any write after a settled hash does."""
    old = path.stat().st_ctime_ns
    deadline = time.monotonic() + deadline_s
    while True:
        rewrite()
        if path.stat().st_ctime_ns != old:
            return
        assert time.monotonic() < deadline, "the file's ctime never moved"


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.txt"
    path.write_text(train_model_text(1))
    return path


@pytest.fixture
def store(tmp_path, model_file) -> tuple[LocalStore, object, Path]:
    store = LocalStore(tmp_path / "store", VerifiedFiles(clock_ns=settled_clock))
    stored = store.put_file(model_file)
    return store, stored, store.root / stored.artifact


def test_an_unchanged_artifact_is_hashed_once(store, model_file):
    store, stored, _ = store
    for _ in range(3):
        assert store.read_verified(stored.artifact, stored.sha256, WHAT) == model_file.read_bytes()
    assert (store.verified.hashed, store.verified.trusted) == (1, 2)


def test_a_rewrite_in_place_is_hashed_again_and_refused(store):
    store, stored, path = store
    good = store.read_verified(stored.artifact, stored.sha256, WHAT)
    bad = good[:100] + bytes([good[100] ^ 1]) + good[101:]  # one bit: the same size
    st = path.stat()

    def rewrite() -> None:
        with open(path, "r+b") as fh:
            fh.write(bad)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: ctime still moves

    ctime_moves_past(path, rewrite)
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    with pytest.raises(FailedPrecondition, match="artifact is corrupt"):
        store.read_verified(stored.artifact, stored.sha256, WHAT)
    assert store.verified.trusted == 0


def test_a_replacement_by_rename_is_hashed_again(store, tmp_path):
    store, stored, path = store
    good = store.read_verified(stored.artifact, stored.sha256, WHAT)
    other = tmp_path / "other.lgbm"
    other.write_bytes(good[:-1] + b"X")
    os.replace(other, path)  # a new inode at the same path
    with pytest.raises(FailedPrecondition, match="artifact is corrupt"):
        store.read_verified(stored.artifact, stored.sha256, WHAT)


def test_a_file_written_within_the_settle_time_is_hashed_on_every_read(tmp_path, model_file):
    store = LocalStore(tmp_path / "store", VerifiedFiles(settle_s=3600))  # the real clock: every file is recent
    stored = store.put_file(model_file)
    for _ in range(3):
        store.read_verified(stored.artifact, stored.sha256, WHAT)
    assert (store.verified.hashed, store.verified.trusted, len(store.verified)) == (3, 0, 0)


def test_a_trusted_file_is_not_trusted_for_another_digest(store):
    store, stored, path = store
    store.read_verified(stored.artifact, stored.sha256, WHAT)
    other = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(FailedPrecondition, match="artifact is corrupt"):
        store.read_verified(stored.artifact, other, WHAT)  # a record naming this path with another digest


def test_a_write_between_the_two_stats_is_not_remembered_or_trusted(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 64)
    verified = VerifiedFiles(clock_ns=settled_clock)
    before = os.stat(path)
    ctime_moves_past(path, lambda: path.write_bytes(b"b" * 64))
    after = os.stat(path)
    verified.remember("digest", before, after, settled_clock())
    assert len(verified) == 0
    verified.remember("digest", after, after, settled_clock())
    assert verified.trusts("digest", after, after)
    assert not verified.trusts("digest", before, after) and not verified.trusts("digest", before, before)


def test_capacity_keeps_the_most_recently_used(tmp_path):
    verified = VerifiedFiles(capacity=2, clock_ns=settled_clock)
    stats = {}
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode())
        stats[name] = os.stat(tmp_path / name)
    verified.remember("a", stats["a"], stats["a"], settled_clock())
    verified.remember("b", stats["b"], stats["b"], settled_clock())
    assert verified.trusts("a", stats["a"], stats["a"])  # a is now the most recent
    verified.remember("c", stats["c"], stats["c"], settled_clock())
    assert len(verified) == 2
    assert verified.trusts("a", stats["a"], stats["a"]) and verified.trusts("c", stats["c"], stats["c"])
    assert not verified.trusts("b", stats["b"], stats["b"])
