"""Keeping a worker's RSS close to its model budget.

A worker loads and frees models all day from several threads. glibc gives each thread its own
arena and keeps freed pages, so RSS drifts well above what the live models hold. Two fixes:
cap the arenas at start (`limit_arenas`; `arenas_for` says how many: no more than the load
threads that contend for them), and hand free heap pages back to the OS after evictions
(`trim`, run from a background task, never on the request path). Under jemalloc
(modelfleet.allocator) `trim` purges every arena's unused dirty pages instead, which jemalloc
would otherwise hand back only over ~10 s; capping arenas is glibc's alone (a no-op there).
"""
from __future__ import annotations

import ctypes

from modelfleet import allocator, procfs

_M_ARENA_MAX = -8

_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena

try:
    _libc = ctypes.CDLL(None)
    _mallopt = _libc.mallopt
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc
    _mallopt = _malloc_trim = None


def arenas_for(load_threads: int) -> int:
    """Arenas for a worker with `load_threads` load threads: one each, at most one per core, at
    least 2. Parsing a model allocates thousands of small blocks, and threads sharing an arena
    queue on its lock: on 16 cores, 16 load threads with 2 arenas spent 7.4 ms of CPU per load
    against 4.3 ms with 16 (`python -m loadtest.bench`, zipf10k cells, instrumented loads)."""
    return max(2, min(load_threads, procfs.usable_cores()))


def limit_arenas(arenas: int = 2) -> bool:
    """Caps malloc arenas (before many threads allocate); False where unsupported."""
    return bool(_mallopt is not None and _mallopt(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Returns free heap memory to the OS (costs up to a few ms: call off the event loop)."""
    mallctl = allocator.mallctl()
    if mallctl is not None:
        return mallctl(f"arena.{_ARENAS_ALL}.purge".encode(), None, None, None, 0) == 0
    return bool(_malloc_trim is not None and _malloc_trim(0))
