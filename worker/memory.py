"""Keeping a worker's RSS close to its model budget (glibc malloc).

A worker loads and frees models all day from several threads. glibc gives each thread its own
arena and keeps freed pages, so RSS drifts well above what the live models hold. Two fixes:
cap the arenas at start (`limit_arenas`), and hand free heap pages back to the OS after
evictions (`trim`, run from a background task, never on the request path).
"""
from __future__ import annotations

import ctypes

_M_ARENA_MAX = -8

try:
    _libc = ctypes.CDLL(None)
    _mallopt = _libc.mallopt
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc
    _mallopt = _malloc_trim = None


def limit_arenas(arenas: int = 2) -> bool:
    """Caps malloc arenas (before many threads allocate); False where unsupported."""
    return bool(_mallopt is not None and _mallopt(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Returns free heap memory to the OS (costs up to a few ms: call off the event loop)."""
    return bool(_malloc_trim is not None and _malloc_trim(0))
