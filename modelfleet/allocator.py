"""Which malloc a router or worker runs on: jemalloc where the system has it, else the C library's.

Why: a worker loads and evicts models all day, and LightGBM's parser makes and frees many small
strings and vectors per tree; gRPC's C core allocates per message in both servers. Under
glibc's malloc a worker in a miss-heavy benchmark spent ~25 % of its load threads' CPU in
malloc and free (`perf`, zipf100k with 8 callers, 2 cores), and glibc's `mallinfo2`, which
sizes models at load, walks every free chunk under the arena locks. With jemalloc a worker
took 20-33 % less CPU per request in the zipf100k cells (README, "Allocator").

jemalloc has to be in place before the first allocation, so it is preloaded (LD_PRELOAD) at
exec time. Launchers that start routers and workers (modelfleet.local_fleet: `modelfleet up`,
the tests, the benchmarks) put it in the child's environment (`preload_env`); a process started
any other way (Kubernetes, by hand) re-executes itself once in `ensure`, with the same PID,
arguments and environment plus LD_PRELOAD, ~0.3 s later than it would have started. The flag
always wins: `--allocator system` in a child whose launcher preloaded jemalloc re-executes
without it.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable, Mapping

from modelfleet import config
from modelfleet.errors import FailedPrecondition

# Set in a re-executed process's environment: it never re-executes again, whatever happens.
_REEXECUTED = "MODELFLEET_ALLOCATOR_REEXECUTED"


@functools.lru_cache(maxsize=1)
def mallctl() -> Callable[..., int] | None:
    """jemalloc's `mallctl(name, oldp, oldlenp, newp, newlen)` when jemalloc is this process's
    malloc, else None. Its calls take microseconds, so they keep the GIL (PyDLL)."""
    try:
        fn = ctypes.PyDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def jemalloc_active() -> bool:
    """Whether this process's malloc is jemalloc (its `mallctl` is linked in)."""
    return mallctl() is not None


def active() -> str:
    return "jemalloc" if jemalloc_active() else "system"


@functools.lru_cache(maxsize=1)
def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic linker finds it (Debian: libjemalloc2)."""
    return ctypes.util.find_library("jemalloc")


def resolve(choice: str) -> str:
    """What a process started with `choice` (auto, jemalloc, system) runs on: 'jemalloc' or 'system'."""
    if choice == "system":
        return "system"
    if jemalloc_active() or find_jemalloc() is not None:
        return "jemalloc"
    if choice == "jemalloc":
        raise FailedPrecondition("--allocator jemalloc: no jemalloc library on this system "
                                 "(Debian: apt-get install libjemalloc2; or --allocator auto/system)")
    return "system"


def preload_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child router or worker, preloading what its MODELFLEET_ALLOCATOR asks for, so
    that it starts on it without re-executing. A choice that cannot be met is left to the child
    (which refuses to start, saying why)."""
    try:  # read as the child will read it (any case), so the two never disagree
        want = resolve(config.ALLOCATOR.type(env.get(config.ALLOCATOR.env) or config.ALLOCATOR.default))
    except (argparse.ArgumentTypeError, FailedPrecondition):
        return env
    return _with_preload(env, want)


def ensure(choice: str) -> str:
    """Makes this process run on the allocator `choice` names, re-executing it if it must;
    returns the allocator it runs on. Call it first thing, before threads or sockets exist."""
    want = resolve(choice)
    if want == active():
        return want
    if os.environ.get(_REEXECUTED):  # re-executed already, and still not on it: an unusual interpreter
        if choice == "auto":
            return active()
        raise FailedPrecondition(f"--allocator {choice}: re-executing with LD_PRELOAD did not take effect")
    env = _with_preload(os.environ, want)
    env[_REEXECUTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")  # execve returns only by raising


def _with_preload(env: Mapping[str, str], want: str) -> dict[str, str]:
    """A copy of `env` whose LD_PRELOAD has jemalloc first (want 'jemalloc') or not at all."""
    env = dict(env)
    kept = [entry for entry in env.get("LD_PRELOAD", "").replace(":", " ").split() if "jemalloc" not in entry]
    if want == "jemalloc":
        kept.insert(0, find_jemalloc() or "libjemalloc.so.2")
    if kept:
        env["LD_PRELOAD"] = " ".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env
