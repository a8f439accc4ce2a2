"""`modelfleet up`: the demo fleet starts, serves, and shuts down leaving no process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc

from modelfleet import processes
from modelfleet.demo_models import sample_features
from tests.fleet import REPO_ROOT, predict, predictor


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def start_up(tmp_path: Path, *argv: str) -> tuple[subprocess.Popen, list[str], threading.Thread, Path, dict, int]:
    """`modelfleet up ARGV` on free ports, its home and TMPDIR under tmp_path; its output lines
    are collected in the returned list. Returns (process, output, reader, scratch, env, router port)."""
    etcd_port, router_port = processes.free_port(), processes.free_port()
    scratch = tmp_path / "tmp"  # its temporary files (etcd's data) go here, to be checked for leftovers
    scratch.mkdir()
    env = dict(os.environ, MODELFLEET_HOME=str(tmp_path / "home"), MODELFLEET_STORE=str(tmp_path / "store"),
               MODELFLEET_ETCD=f"127.0.0.1:{etcd_port}", PYTHONPATH=str(REPO_ROOT), TMPDIR=str(scratch))
    up = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "up", *argv, "--port", str(router_port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(up.stdout.readline, "")), daemon=True)
    reader.start()
    return up, output, reader, scratch, env, router_port


def test_up_serves_the_demo_fleet_and_stops_cleanly(tmp_path):
    up, output, reader, scratch, env, router_port = start_up(tmp_path, "--workers", "2", "--demo-tenants", "6")
    try:
        stub = predictor(f"127.0.0.1:{router_port}")
        x = sample_features(1, 1, 8)[0]

        def serving():
            assert up.poll() is None, "".join(output)
            return predict(stub, "demo-0006", x, timeout=2)

        answer = processes.wait_for(serving, 90, interval=0.2, what="the demo fleet")
        processes.wait_for(lambda: any("modelfleet is up" in line for line in output), 30, what="the banner")
        assert answer.model_version == "v1" and answer.worker_id in ("worker-1", "worker-2")

        # Every other command works against the demo fleet with no flags but the environment.
        done = subprocess.run([sys.executable, "-m", "modelfleet.cli", "workers", "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "worker-2" in done.stdout, done.stderr

        kids = children_of(up.pid)
        assert len(kids) == 4  # etcd, 2 workers, router
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, "".join(output)
        reader.join(10)
        assert "stopped" in "".join(output)
        processes.wait_for(lambda: not any(processes.pid_alive(k) for k in kids), 10, what="children to exit")
        assert list(scratch.iterdir()) == [], "a stopped fleet left temporary files behind"
        try:
            predict(stub, "demo-0006", x, timeout=1)
            raise AssertionError("the router still answers after shutdown")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_sigterm_during_start_up_stops_at_once_and_leaves_nothing(tmp_path):
    """Training and registering many demo tenants is abandoned, not finished first."""
    up, output, reader, scratch, _, _ = start_up(tmp_path, "--demo-tenants", "5000")
    try:
        processes.wait_for(lambda: any("training and registering" in line for line in output), 60,
                           what="start-up to reach the demo tenants")
        kids = children_of(up.pid)
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0, "".join(output)  # 5000 tenants would take minutes
        reader.join(10)
        assert "stopped" in "".join(output) and "modelfleet is up" not in "".join(output)
        processes.wait_for(lambda: not any(processes.pid_alive(k) for k in kids), 10, what="children to exit")
        assert list(scratch.iterdir()) == [], "an interrupted start-up left temporary files behind"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_free_ports_come_from_below_the_ephemeral_range_and_never_twice():
    """Outgoing connections take their local port from the ephemeral range: a port from there,
    told to a child, can be gone by the time the child binds it (a router once failed so)."""
    low, _ = processes._ephemeral_range()
    ports = [processes.free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(1024 <= p < low for p in ports)
