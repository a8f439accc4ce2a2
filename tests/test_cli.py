"""The modelfleet CLI as a user runs it: a real process against a real etcd and fleet."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from modelfleet.cli.main import build_parser
from modelfleet.demo_models import sample_features
from tests import cli_fork_server
from tests.fleet import REPO_ROOT, Fleet


def cli(fleet: Fleet, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m modelfleet.cli *argv` as a real process of its own, forked from one that has
    imported the CLI already (tests.cli_fork_server: ~0.5 s of interpreter start a command less)."""
    return cli_fork_server.run(list(argv), fleet.env(), timeout=timeout)


def test_admin_commands_end_to_end(fleet):
    model = fleet.model_file(1)
    done = cli(fleet, "register", "--tenant", "acme", "--version", "v1", "--model-file", str(model))
    assert done.returncode == 0, done.stderr
    assert "acme v1 registered" in done.stdout
    assert cli(fleet, "register", "--tenant", "acme", "--version", "v2", "--model-file",
               str(fleet.model_file(2))).returncode == 0

    assert cli(fleet, "pin", "acme", "v1").returncode == 0
    versions = json.loads(cli(fleet, "versions", "acme", "--json").stdout)
    assert versions["route"]["serving"] == "v1" and versions["route"]["pinned"] is True
    assert [v["version"] for v in versions["versions"]] == ["v1", "v2"]
    assert cli(fleet, "unpin", "acme").returncode == 0
    assert json.loads(cli(fleet, "versions", "acme", "--json").stdout)["route"]["serving"] == "v2"
    table = cli(fleet, "versions", "acme")
    assert table.returncode == 0 and "serving" in table.stdout

    fleet.start_worker("w1", zone="a")
    fleet.start_worker("w2", zone="b")
    router = fleet.start_router()
    workers = json.loads(cli(fleet, "workers", "--json").stdout)
    assert [(w["worker_id"], w["zone"]) for w in workers] == [("w1", "a"), ("w2", "b")]
    shard = json.loads(cli(fleet, "shard", "acme", "--json").stdout)
    assert sorted(w["worker_id"] for w in shard["workers"]) == ["w1", "w2"]

    features = ",".join(str(v) for v in sample_features(1, 1)[0])
    out = cli(fleet, "predict", "acme", "--features", features, "--router", router.address)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model_version"] == "v2" and len(answer["predictions"]) == 1
    assert answer["worker_id"] == shard["workers"][0]["worker_id"]  # affinity to the first member


def test_set_limits_changes_only_the_limits_given_and_refuses_bad_values(fleet):
    fleet.register("acme", "v1", seed=1)
    shown = lambda: json.loads(cli(fleet, "set-limits", "acme", "--json").stdout)  # noqa: E731
    assert shown() == {"tenant": "acme", "rate_limit": None, "burst": None, "max_inflight": None}
    assert cli(fleet, "set-limits", "acme", "--rate", "50", "--max-inflight", "8").returncode == 0
    assert cli(fleet, "set-limits", "acme", "--burst", "100").returncode == 0  # keeps rate and in-flight
    assert shown() == {"tenant": "acme", "rate_limit": 50.0, "burst": 100.0, "max_inflight": 8}
    for bad in (("--rate", "-1"), ("--max-inflight", "0"), ("--burst", "inf")):
        done = cli(fleet, "set-limits", "acme", *bad)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert cli(fleet, "set-limits", "acme", "--rate", "fast").returncode == 2  # not a number: usage error
    assert cli(fleet, "set-limits", "acme", "--rate", "default").returncode == 0
    assert shown() == {"tenant": "acme", "rate_limit": None, "burst": 100.0, "max_inflight": 8}
    assert cli(fleet, "set-limits", "nobody", "--rate", "5").returncode == 1


def test_errors_are_one_line_and_nonzero(fleet):
    cases = [
        ("pin", "nobody", "v1"),
        ("versions", "bad/tenant"),
        ("register", "--tenant", "acme", "--version", "v1", "--model-file", "/nonexistent/model.txt"),
        ("predict", "acme", "--features", "1,2,x", "--router", "127.0.0.1:1"),
    ]
    for argv in cases:
        done = cli(fleet, *argv)
        assert done.returncode != 0, argv
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, done.stderr)
    bad_loop = cli(fleet, "router", "--event-loop", "tokio")  # a usage error, before anything starts
    assert bad_loop.returncode == 2 and "expected 'uvloop' or 'asyncio', got 'tokio'" in bad_loop.stderr
    bad_transport = cli(fleet, "router", "--worker-transport", "pigeon")
    assert bad_transport.returncode == 2 and "expected 'stream' or 'unary', got 'pigeon'" in bad_transport.stderr


def test_unreachable_etcd_is_a_clear_error(fleet):
    done = cli(fleet, "workers", "--etcd", "127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.startswith("error: etcd at 127.0.0.1:1 unavailable"), done.stderr


def test_two_cli_pins_racing_one_wins_the_other_gets_a_conflict(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.register("acme", "v2", seed=2)
    env = dict(fleet.env(), MODELFLEET_FAILPOINT_DIR=str(fleet.root))
    procs = {v: subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "pin", "acme", v], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("v1", "v2")}
    fleet.wait_for(lambda: len(list(fleet.root.glob("before_route_write.*.ready"))) == 2,
                   what="both CLIs to have read the route")
    (fleet.root / "before_route_write.go").touch()  # now both write
    outcomes = {v: (p.wait(60), p.stderr.read()) for v, p in procs.items()}
    winners = [v for v, (rc, _) in outcomes.items() if rc == 0]
    losers = [v for v, (rc, _) in outcomes.items() if rc != 0]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "changed concurrently" in outcomes[losers[0]][1]
    route, _ = fleet.registry.route("acme")
    assert route.serving == winners[0] and route.pinned
    assert [h.to_version for h in fleet.registry.history("acme") if h.action == "pin"] == winners  # nothing lost


@pytest.mark.parametrize("argv,env,needle", [
    (("router",), {"MODELFLEET_AUTH": "enabled"}, "MODELFLEET_AUTH"),  # never read as "off"
    (("worker",), {"MODELFLEET_WARM_ON_JOIN": "maybe"}, "MODELFLEET_WARM_ON_JOIN"),
    (("router", "--port", "99999"), {}, "from 0 to 65535"),  # not wrapped onto another port
    (("worker", "--metrics-port", "-1"), {}, "from 0 to 65535"),
    (("worker",), {"MODELFLEET_CACHE_BYTES": "12XB"}, "MODELFLEET_CACHE_BYTES"),
    (("worker", "--cache-bytes", "0"), {}, "byte size > 0"),
    (("worker", "--cache-bytes", "1e999GiB"), {}, "byte size like"),
    (("worker", "--cache-bytes", "99999999999999999999"), {}, "at most 9223372036854775807"),  # int64 in Stats
    (("worker", "--max-queued-loads", "-1"), {}, ">= 0"),
    (("worker", "--load-threads", "0"), {}, ">= 1"),
    (("worker", "--fetch-threads", "0"), {}, "argument --fetch-threads: expected a whole number >= 1, got '0'"),
    (("worker",), {"MODELFLEET_FETCH_THREADS": "many"}, "MODELFLEET_FETCH_THREADS"),
    (("worker", "--warm-join-budget", "-1"), {}, "argument --warm-join-budget: expected a number >= 0"),
    (("worker",), {"MODELFLEET_WARM_JOIN_BUDGET": "inf"}, "MODELFLEET_WARM_JOIN_BUDGET"),
    (("router", "--default-deadline", "nan"), {}, "finite"),
    (("router", "--lease-ttl", "1"), {}, ">= 2"),
    (("router", "--spill-inflight", "0"), {}, ">= 1"),
    (("router", "--shadow-budget", "-1"), {}, ">= 0"),
    (("versions", "acme", "--log-level", "bogus"), {}, "MODELFLEET_LOG_LEVEL"),
    (("up", "--workers", "0"), {}, ">= 1"),
    (("predict", "acme", "--features", "1", "--timeout", "inf"), {}, "finite"),
    (("status", "--interval", "0"), {}, "> 0"),
    (("set-shard-size", "acme", "abc"), {}, "or 'default'"),
    (("set-shard-size", "acme", "5000"), {}, "from 1 to 1024"),
    (("shards", "plan", "--set-size", "acme", "5000"), {}, "acme: expected a whole number from 1 to 1024"),
    (("workers", "drain", "w1", "--reason", "  "), {}, "argument --reason: expected some text"),
    (("workers", "drain", "w1", "--reason", "x" * 201), {}, "at most 200 characters, got 201"),
    (("workers", "drain", "w1", "--reason", "ok\nw2 drained by root: forged"), {}, "printable text on one line"),
    (("shards", "apply", "--drain", "w1", "--reason", "\x1b[2J"), {}, "printable text on one line"),
    (("pin", "acme", "v1", "--reason", "ok\n2026-01-01 root pin v1"), {}, "printable text on one line"),  # history
    *((("rollout", "acme", "v2", "--percent", bad), {}, f"percentage from 0.01 to 100 (to 0.01), got '{bad}'")
      for bad in ("0", "-5", "nan", "inf", "100.5", "0.001", "1e-9", "5%")),  # below 0.01: under one bucket
    (("rollout", "acme", "v2", "--percent", "5", "--reason", "x" * 201), {}, "at most 200 characters, got 201"),
    (("register", "--tenant", "t", "--version", "v", "--model-file", "m", "--reason", " "), {}, "expected some text"),
    (("rollback", "acme", "--actor", "\x1b[2Jroot"), {}, "printable text on one line"),
    (("import", "m.csv", "--actor", "a" * 129), {}, "at most 128 characters, got 129"),
    (("workers", "undrain", "w1", "--warm-timeout", "0"), {}, "> 0"),
    (("shards", "apply", "--undrain", "w1"), {"MODELFLEET_WARM_TIMEOUT": "soon"}, "MODELFLEET_WARM_TIMEOUT"),
    (("gc", "--keep", "1", "--tombstone-days", "0"), {}, "expected a number > 0, got '0'"),
    (("gc", "--keep", "1"), {"MODELFLEET_GC_TOMBSTONE_DAYS": "a week"}, "MODELFLEET_GC_TOMBSTONE_DAYS"),
])
def test_bad_settings_are_usage_errors_that_name_the_flag(monkeypatch, capsys, argv, env, needle):
    """Refused by the command line's parser (exit 2), before anything starts, whether the value came
    from the flag or the variable. Only parsed here: a regression must fail, not start a server."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(list(argv))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and needle in stderr, stderr


def test_a_bad_variable_troubles_only_the_commands_that_read_it(fleet):
    fleet.register("acme", "v1", seed=1)
    env = {**fleet.env(), "MODELFLEET_CACHE_BYTES": "12XB"}  # a worker setting; `versions` does not read it
    done = cli_fork_server.run(["versions", "acme", "--json"], env)
    assert done.returncode == 0 and json.loads(done.stdout)["route"]["serving"] == "v1", done.stderr


@pytest.mark.parametrize("argv", [("router", "--port", "{port}"), ("worker", "--port", "{port}"),
                                  ("worker", "--metrics-port", "{port}")])
def test_a_port_in_use_is_a_clear_error_not_a_traceback(fleet, argv):
    """Servers log their start-up events first; the last line says what stopped them."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = cli(fleet, *(arg.format(port=port) for arg in argv))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith("error: cannot ") and port in last and "in use" in last, done.stderr


def test_a_reader_that_leaves_early_gets_no_traceback(fleet):
    """`modelfleet workers --json | head -c 10`: the pipe closes under the command."""
    fleet.start_worker("w1")
    proc = subprocess.Popen([sys.executable, "-m", "modelfleet.cli", "workers", "--json"], env=fleet.env(),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 128 + signal.SIGPIPE and stderr == "", stderr


def test_json_logs_are_json_on_every_line_before_the_exit_line(fleet):
    """gRPC's C core prints its own plain-text lines (here: the failed bind) unless silenced."""
    env = {k: v for k, v in fleet.env().items() if k != "GRPC_VERBOSITY"}  # the CLI chooses (conftest sets it)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "modelfleet.cli", "router", "--port", str(taken.getsockname()[1]),
                               "--log-format", "json"], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60)
    *events, last = done.stderr.strip().splitlines()
    assert done.returncode == 1 and last.startswith("error: cannot listen"), done.stderr
    assert events and all(json.loads(line)["event"] for line in events), done.stderr
