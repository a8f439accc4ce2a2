"""The tests' `modelfleet` commands, each a real process forked from one that has imported the CLI.

The suite runs the CLI ~150 times. A fresh interpreter costs ~0.5 s a command before it does
anything (the interpreter, then grpc, numpy, rich and the CLI's modules), ~75 s of a suite that
must stay within CI's budget. A fork server pays the imports once: each command is still its own
process, forked from the server (its own environment, working directory, stdin/stdout/stderr,
exit code, signals, and interpreter exit with its atexit handlers), running the same
`modelfleet.cli.main.main` as `python -m modelfleet.cli`.

What the server's imports fix once, a command cannot change: gRPC's C core reads GRPC_VERBOSITY
when grpc is imported, and the CLI picks it from its log format. Commands asking for JSON logs
(`--log-format json`, MODELFLEET_LOG_FORMAT=json) therefore run in a fresh interpreter, as do all
commands when MODELFLEET_TEST_CLI_FORK=0.

Protocol (AF_UNIX SOCK_SEQPACKET, one connection per command): the client sends one JSON message
{argv, env, cwd} with three descriptors (stdin, stdout, stderr); the server forks, answers the
child's pid, then its exit code once it has exited.
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_INT = struct.Struct("i")
_START_TIMEOUT_S = 30.0

_server: subprocess.Popen | None = None
_socket_path: str | None = None
_lock = threading.Lock()


def run(argv: list[str], env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m modelfleet.cli *argv` with `env`, in REPO_ROOT: its exit code and output."""
    command = [sys.executable, "-m", "modelfleet.cli", *argv]
    if not _forkable(argv, env):
        return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    path = _ensure_server()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        request = json.dumps({"argv": argv, "env": env, "cwd": str(REPO_ROOT)}).encode()
        socket.send_fds(conn, [request], [null, out_w, err_w])
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    try:
        (pid,) = _INT.unpack(conn.recv(_INT.size))
        out, err = _read_until_closed((out_r, err_r), pid, timeout, command)
        answer = conn.recv(_INT.size)
        if len(answer) != _INT.size:
            raise RuntimeError(f"the CLI fork server gave no exit code for {argv!r}; see its log")
        (code,) = _INT.unpack(answer)
    finally:
        conn.close()
        os.close(out_r)
        os.close(err_r)
    return subprocess.CompletedProcess(command, code, out.decode(errors="replace"), err.decode(errors="replace"))


def _forkable(argv: list[str], env: dict[str, str]) -> bool:
    from modelfleet.cli.main import _json_logs  # the CLI's own reading of its log format

    return env.get("MODELFLEET_TEST_CLI_FORK", os.environ.get("MODELFLEET_TEST_CLI_FORK", "1")) != "0" \
        and not _json_logs(argv, env)


def _read_until_closed(fds: tuple[int, int], pid: int, timeout: float, command: list[str]) -> tuple[bytes, bytes]:
    """Everything written to both pipes until every writer closed them (the command and anything
    it left running), as subprocess.run reads; past `timeout`, the command is killed."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                raise subprocess.TimeoutExpired(command, timeout)
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
    return b"".join(chunks[fds[0]]), b"".join(chunks[fds[1]])


def _ensure_server() -> str:
    global _server, _socket_path
    with _lock:
        if _server is not None and _server.poll() is None:
            return _socket_path  # type: ignore[return-value]
        directory = tempfile.mkdtemp(prefix="mf-cli-fork-")
        path = os.path.join(directory, "socket")
        # Its own environment, without the MODELFLEET_* settings of whichever test came first:
        # each command brings its own, and the imports must not read a test's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
        log = open(os.path.join(directory, "server.log"), "ab")
        _server = subprocess.Popen([sys.executable, "-m", "tests.cli_fork_server", path], cwd=REPO_ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not os.path.exists(path + ".ready"):
            if _server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CLI fork server did not start: {Path(directory, 'server.log').read_text()}")
            time.sleep(0.01)  # polling for the file the server writes once it listens, with a deadline
        _socket_path = path
        atexit.register(_stop, _server, directory)
        return path


def _stop(server: subprocess.Popen, directory: str) -> None:
    server.terminate()
    try:
        server.wait(5)
    except subprocess.TimeoutExpired:
        server.kill()
    shutil.rmtree(directory, ignore_errors=True)


# -- the server ---------------------------------------------------------------------------------

def _serve(path: str) -> None:
    from modelfleet.cli import main as cli_main
    import modelfleet.cli.admin  # noqa: F401 - what most commands import: paid once, here
    import modelfleet.cli.rollout_status  # noqa: F401
    import modelfleet.cli.status  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    Path(path + ".ready").touch()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = listener.accept()
        try:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message)
        except (OSError, ValueError):
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:  # the command: a process of its own from here on
            listener.close()
            conn.close()
            raise SystemExit(_command(cli_main.main, request, fds))  # the interpreter's own exit: atexit, flushes
        for fd in fds:
            os.close(fd)
        conn.sendall(_INT.pack(pid))
        threading.Thread(target=_reap, args=(pid, conn), daemon=True).start()


def _command(main, request: dict, fds: list[int]) -> int:
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # As `python -m modelfleet.cli` has them: a server command re-executes itself from these to
    # run on jemalloc (modelfleet.allocator), which must start the CLI, not this server.
    sys.argv = [str(REPO_ROOT / "modelfleet" / "cli" / "__main__.py"), *request["argv"]]
    sys.orig_argv = [sys.executable, "-m", "modelfleet.cli", *request["argv"]]
    try:
        return int(main(request["argv"]) or 0)
    except SystemExit as exc:  # argparse's usage errors (2), --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what `python -m modelfleet.cli` would print before exiting 1
        traceback.print_exc()
        return 1


def _reap(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall(_INT.pack(os.waitstatus_to_exitcode(status)))
    except OSError:
        pass  # the test gave up on it (a timeout)
    finally:
        conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
