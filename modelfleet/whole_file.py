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
        data = os.read(fd, stat.st_size + 1)
        if len(data) != stat.st_size:
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data, stat
    finally:
        os.close(fd)
