"""Child processes that never outlive their parent, and free loopback ports.

`modelfleet up`, the tests and the benchmarks start etcd, workers and routers as children. Each
child gets PR_SET_PDEATHSIG=SIGTERM, so even a SIGKILLed parent leaves no orphans behind.

Not with `preexec_fn`: that makes subprocess fork() a parent that runs gRPC threads, and gRPC's
fork handlers can abort the child ("epoll_wait error: Bad file descriptor"). Instead the child
is this module run as a launcher (`python -m modelfleet.processes PARENT_PID ARGV...`), which
sets the death signal on itself, checks the parent is still there, and execs ARGV: the setting
survives exec, and subprocess can use vfork/posix_spawn.
"""
from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Arms SIGTERM for this process when its parent dies (also a process pool's initializer,
    with `initargs=(os.getpid(),)`). Given the parent's PID, exits at once when the parent died
    before the signal was armed: a child that took a second to start can outlive a killed parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: best effort
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def exit_on_sigterm() -> None:
    """SIGTERM (`timeout`, `kill`, a cancelled CI job) raises SystemExit(143) in the main thread, so
    `finally` blocks and context managers run as on Ctrl-C: a benchmark's temp dirs go with it."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def interrupt_once() -> None:
    """The first SIGINT raises KeyboardInterrupt as usual; later ones are ignored, so a second
    Ctrl-C (impatient, or a terminal's repeat) cannot cut short the clean-up the first one
    started: children left running, temp dirs left behind, a traceback from inside `finally`.
    The clean-up stays bounded: `stop` SIGKILLs what has not exited after its timeout."""

    def interrupted(_signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None, stdout: IO | int | None = None,
          stderr: IO | int | None = None) -> subprocess.Popen:
    """Starts argv as a child that receives SIGTERM when this process dies."""
    launcher = [sys.executable, "-m", "modelfleet.processes", str(os.getpid())]
    return subprocess.Popen([*launcher, *argv], env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)


def stop_all(procs: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM to all first, then `stop` each: their shutdowns (a router's drain, a worker's
    grace) overlap instead of adding up."""
    for proc in procs:
        _ask_to_stop(proc)
    for proc in procs:
        stop(proc, timeout)


def _ask_to_stop(proc: subprocess.Popen) -> None:
    """SIGTERM; a stopped (SIGSTOP) process is continued first, or it would never see it."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        except ProcessLookupError:
            pass


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM (`_ask_to_stop`), wait up to timeout, then SIGKILL; returns the exit code."""
    _ask_to_stop(proc)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return proc.returncode


_HANDED_OUT: set[int] = set()
_BELOW_EPHEMERAL = 12_000  # ports tried below the kernel's ephemeral range


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, for a child that must be told one before it listens.

    Taken below the kernel's ephemeral range: a port the kernel hands out (bind to 0, or the
    local end of any outgoing connection, such as a worker's to etcd) can be taken again by
    such a connection between this check and the child's bind, and the child then fails
    "address already in use" (seen once in a full suite). Never the same port twice in one
    process. Where no room is left below the range: the kernel's choice."""
    low, _ = _ephemeral_range()
    start = max(1024, low - _BELOW_EPHEMERAL)
    for _ in range(200 if low - start >= 1000 else 0):
        port = random.randrange(start, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Polls predicate until it returns a truthy value or timeout passes (then TimeoutError).

    Exceptions raised by predicate count as 'not yet'; the last one is chained on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - 'not ready yet' may look like anything
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}") from last_exc
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _launch(args: list[str]) -> None:
    parent, argv = int(args[0]), args[1:]
    die_with_parent(parent)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _launch(sys.argv[1:])
