"""Reading an artifact file in as few system calls as Python allows.

A worker reads artifacts on its load threads while the event loop thread holds the GIL most of
the time, and every system call hands the GIL back and waits to retake it. `Path.read_bytes`
makes nine calls for one file (open, two fstats, an ioctl, two lseeks, two reads, close); this
makes four (open, fstat, read, close). On a 16-core machine with the event loop busy, reading
and verifying a 300 KB artifact took ~5 ms p50 of waiting for ~0.3 ms of work
(`python -m loadtest.bench` cells, instrumented).
"""
from __future__ import annotations

import os


def read_whole_file(path: str | os.PathLike) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the fstat taken before reading them (its identity: st_dev, st_ino).

    One read of size + 1 bytes gets a regular file whole; a short read (a network mount, a
    signal) or a file that grew since the fstat is read on to its end.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = os.fstat(fd)
        return _read_all(fd, stat.st_size), stat
    finally:
        os.close(fd)


def read_whole_file_between_stats(path: str | os.PathLike) -> tuple[bytes, os.stat_result, os.stat_result]:
    """The file's bytes and its fstat before and after reading them: equal stats (identity,
    size, mtime, ctime) say no write reached the file between them (modelfleet.verified_files).
    One system call more than `read_whole_file`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        data = _read_all(fd, before.st_size)
        return data, before, os.fstat(fd)
    finally:
        os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1)
    if len(data) != size:
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
    return data
