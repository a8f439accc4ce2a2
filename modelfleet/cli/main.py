"""`modelfleet`: one command line for running and administering a fleet.

Each subcommand declares the config options it reads (flags with MODELFLEET_* fallbacks) and
a function that does the work. Errors print as one line on stderr with a non-zero exit code,
never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Mapping, Sequence


def _json_logs(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this process logs JSON (--log-format json, or MODELFLEET_LOG_FORMAT), read before
    the parser exists: gRPC's C core reads GRPC_VERBOSITY once, when grpc is imported."""
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            return argv[i + 1].strip().lower() == "json"
        if arg.startswith("--log-format="):
            return arg.split("=", 1)[1].strip().lower() == "json"
    return environ.get("MODELFLEET_LOG_FORMAT", "").strip().lower() == "json"


# gRPC's C core prints INFO lines (a failed TLS handshake, ...) straight to stderr, around the
# one-line error a command prints; ERROR and up only, unless the operator asks for more. With
# JSON logs, none: its plain-text lines would break "one JSON object per line" (what they would
# report, modelfleet logs as its own events: a failed bind, a lost stream, a failover).
_OURS = "GRPC_VERBOSITY" not in os.environ  # an operator's own setting wins
os.environ.setdefault("GRPC_VERBOSITY", "NONE" if _json_logs(sys.argv[1:], os.environ) else "ERROR")

import grpc  # noqa: E402 - after GRPC_VERBOSITY, which the C core reads once, at import

if _OURS:  # read: children (workers of `up`, tests' servers) choose for their own log format
    del os.environ["GRPC_VERBOSITY"]

from modelfleet import allocator, config, event_loop, log  # noqa: E402
from modelfleet.errors import ModelfleetError

Command = Callable[[argparse.Namespace], int | None]

ETCD_ACCESS = (config.ETCD_USER, config.ETCD_PASSWORD, config.ETCD_CA, config.ETCD_CERT, config.ETCD_KEY)
WORKER_CLIENT_TLS = (config.TLS_CA, config.TLS_CERT, config.TLS_KEY)
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # as a tool killed by SIGPIPE exits
ACTOR_CHARS = 128  # --actor of a change: a name, not a note


def _run_worker(args: argparse.Namespace) -> None:
    allocator.ensure(args.allocator)  # may re-execute this process: before any thread or socket
    from worker.server import serve

    event_loop.run(serve(args), args.event_loop)


def _run_router(args: argparse.Namespace) -> None:
    allocator.ensure(args.allocator)
    from router.server import serve

    event_loop.run(serve(args), args.event_loop)


class _LateModule:
    """A command module as `build_parser` sees it: `_LateModule("modelfleet.cli.up").run` is a
    handler that imports the module when its command runs, not when the parser is built, so
    `modelfleet pin` (and every router) starts without LightGBM, SciPy and the other commands'
    modules (~0.3 s less per start)."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Command:
        def handler(args: argparse.Namespace) -> int | None:
            return getattr(importlib.import_module(self._module), name)(args)

        return handler


def build_parser() -> argparse.ArgumentParser:
    from modelfleet.cli import admin, shards  # their argument types and helpers are used below

    up, bulk, client, demo_fleet, keys, rollouts, status = (
        _LateModule(f"modelfleet.cli.{name}")
        for name in ("up", "bulk", "client", "demo_fleet", "keys", "rollouts", "status"))

    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Command, help_text: str, *options: config.Option) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        config.add_options(sub, *options, *(ETCD_ACCESS if config.ETCD in options else ()), config.LOG_FORMAT,
                           config.LOG_LEVEL)
        sub.set_defaults(handler=handler)
        return sub

    command("up", up.run, "run the demo fleet: local etcd, workers, a router, demo tenants",
            config.ETCD, config.PREFIX, config.STORE, config.ROUTER_PORT, config.UP_WORKERS,
            config.UP_DEMO_TENANTS, config.CACHE_BYTES, config.LEASE_TTL, config.SHARD_SIZE)
    sub = command("demo-fleet", demo_fleet.run, "write a synthetic fleet of distinct LightGBM models and a manifest")
    sub.add_argument("--tenants", type=config.whole(1), required=True)
    sub.add_argument("--out", required=True, help="output directory")
    sub.add_argument("--templates", type=config.whole(1), default=8, help="trained templates the models are derived from")
    sub.add_argument("--versions", type=config.whole(1), default=1, help="versions per tenant")
    sub.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="manifest format")
    sub.add_argument("--force", action="store_true", help="write into a non-empty --out (files there are overwritten)")

    command("router", _run_router, "run one router", *config.ROUTER_OPTIONS)
    command("worker", _run_worker, "run one worker", *config.WORKER_OPTIONS)

    def audited(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Both end up in every `versions --history` table and log: printable, one line (as a drain's reason).
        sub.add_argument("--actor", type=config.one_line(ACTOR_CHARS), default=None, metavar="NAME",
                         help=f"who is making the change (default: the OS user; at most {ACTOR_CHARS} characters)")
        sub.add_argument("--reason", type=shards.REASON_TYPE, default=None, metavar="TEXT",
                         help=f"why, for the history (printable, one line, at most {shards.REASON_CHARS} characters)")
        return sub

    sub = audited(command("register", admin.register, "register a model version for a tenant",
                          config.ETCD, config.PREFIX, config.STORE, config.S3_ENDPOINT))
    sub.add_argument("--tenant", required=True)
    sub.add_argument("--version", required=True)
    sub.add_argument("--model-file", required=True, help="a LightGBM text model file")

    sub = command("set-shard-size", admin.set_shard_size, "give a tenant a larger (or default) shard",
                  config.ETCD, config.PREFIX)
    sub.add_argument("tenant")
    sub.add_argument("size", type=shards.shard_size_or_default,
                     help=f"workers in the tenant's shard (1 to {shards.MAX_SHARD_SIZE}), or 'default'")

    sub = command("set-limits", admin.set_limits, "a tenant's load-shedding limits on each router (show, "
                  "set, or 'default')", config.ETCD, config.PREFIX)
    sub.add_argument("tenant")
    sub.add_argument("--rate", type=admin.limit_value(float), default=admin.KEEP, metavar="RPS|default",
                     help="requests per second per router")
    sub.add_argument("--burst", type=admin.limit_value(float), default=admin.KEEP, metavar="N|default",
                     help="token-bucket size (default: one second of the rate)")
    sub.add_argument("--max-inflight", type=admin.limit_value(int), default=admin.KEEP, metavar="N|default",
                     help="requests of the tenant in flight per router")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = audited(command("import", bulk.run, "register many tenant versions from a CSV or JSONL manifest",
                          config.ETCD, config.PREFIX, config.STORE, config.S3_ENDPOINT))
    sub.add_argument("manifest", help="CSV (tenant,version,artifact) or JSON lines")
    sub.add_argument("--batch", type=int, default=40, help="records per etcd transaction (at most 40)")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")

    sub = audited(command("pin", admin.pin, "serve one version of a tenant until unpinned", config.ETCD, config.PREFIX))
    sub.add_argument("tenant")
    sub.add_argument("version")
    sub = audited(command("unpin", admin.unpin, "serve the tenant's newest version again", config.ETCD, config.PREFIX))
    sub.add_argument("tenant")
    sub = audited(command("rollback", admin.rollback, "pin the version that served before the current one",
                          config.ETCD, config.PREFIX))
    sub.add_argument("tenant")
    sub = command("versions", admin.versions, "list a tenant's versions (and its history)", config.ETCD, config.PREFIX)
    sub.add_argument("tenant")
    sub.add_argument("--history", action="store_true", help="who changed what served, when, and why")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = audited(command("rollout", rollouts.rollout, "canary or shadow a version; promote, abort, status",
                          config.ETCD, config.PREFIX, config.API_KEY, config.TLS_CA, config.TLS_CERT, config.TLS_KEY,
                          config.MEMBERS_TIMEOUT))
    sub.add_argument("tenant")
    sub.add_argument("version", nargs="?", help="the version to roll out (to start a rollout)")
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--percent", type=admin.canary_percent_value, metavar="P",
                      help="canary: this share of the tenant's traffic, 0.01 to 100 (%%), to 0.01")
    mode.add_argument("--shadow", action="store_true", help="shadow: a copy of the traffic, answers compared")
    mode.add_argument("--promote", action="store_true", help="the rollout's version serves from now on")
    mode.add_argument("--abort", action="store_true", help="end the rollout")
    mode.add_argument("--status", action="store_true", help="what every router has seen of the rollout")
    sub.add_argument("--json", action="store_true", help="print JSON (with --status)")
    sub = command("gc", admin.gc, "remove old versions (not newest K, serving, pinned or in a rollout); dry run "
                  "unless --yes", config.ETCD, config.PREFIX, config.STORE, config.S3_ENDPOINT,
                  config.GC_TOMBSTONE_DAYS)
    sub.add_argument("--keep", type=config.whole(1), default=3, help="newest versions to keep per tenant")
    sub.add_argument("--tenant", help="only this tenant's versions")
    sub.add_argument("--yes", action="store_true", help="really delete")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("shard", admin.shard, "the workers of a tenant's shard, in order",
                  config.ETCD, config.PREFIX, config.FLEET_SHARD_SIZE)
    sub.add_argument("tenant")
    sub.add_argument("--json", action="store_true", help="print JSON")
    workers = command("workers", admin.workers, "list the fleet's workers; drain or undrain one",
                      config.ETCD, config.PREFIX)
    workers.add_argument("--json", action="store_true", help="print JSON")
    actions = workers.add_subparsers(dest="action", metavar="ACTION")
    for name, handler, help_text in (
            ("drain", shards.drain, "warm the active tenants' new members, then take the worker out of every shard"),
            ("undrain", shards.undrain, "put a drained worker back into shards (warming first)")):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        config.add_options(sub, config.ETCD, config.PREFIX, config.FLEET_SHARD_SIZE, config.WARM_ACTIVE_MINUTES,
                           config.WARM_TIMEOUT, *ETCD_ACCESS, *WORKER_CLIENT_TLS)
        sub.add_argument("worker_id")
        shards.add_commit_arguments(sub, drains=name == "drain")
        # SUPPRESS: `workers --json drain W` keeps the parent's --json instead of this one's default
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        sub.set_defaults(handler=handler)

    group = commands.add_parser("shards", help="plan, apply and report shard changes",
                                description="plan, apply and report shard changes")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    def shards_action(name: str, handler: Command, help_text: str, *options: config.Option) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        config.add_options(sub, config.ETCD, config.PREFIX, config.FLEET_SHARD_SIZE, *options, *ETCD_ACCESS,
                           config.LOG_FORMAT, config.LOG_LEVEL)
        sub.set_defaults(handler=handler)
        return sub

    shards.add_change_arguments(shards_action("plan", shards.plan, "what a proposed change would move"))
    sub = shards_action("apply", shards.apply, "warm, then commit a change in one transaction",
                        config.WARM_ACTIVE_MINUTES, config.WARM_TIMEOUT, *WORKER_CLIENT_TLS)
    shards.add_change_arguments(sub)
    shards.add_commit_arguments(sub, drains=True)
    sub = shards_action("report", shards.report, "isolation figures for the live fleet or a simulated one")
    sub.add_argument("--simulate-workers", type=config.whole(1), metavar="N", help="report on N simulated workers instead")
    sub.add_argument("--tenants", type=config.whole(1), default=100_000, help="simulated tenants (with --simulate-workers)")
    sub.add_argument("--zones", type=config.whole(1), default=1, help="simulated zones (with --simulate-workers)")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("status", status.run, "the fleet at a glance: workers, models, bytes, req/s, hit rate, revisions",
                  config.ETCD, config.PREFIX, config.API_KEY, config.TLS_CA, config.TLS_CERT, config.TLS_KEY,
                  config.MEMBERS_TIMEOUT)
    sub.add_argument("--once", action="store_true", help="print one snapshot and exit")
    sub.add_argument("--json", action="store_true", help="with --once: print JSON")
    sub.add_argument("--interval", type=config.positive_seconds, default=1.0, help="seconds between refreshes")

    sub = command("keys", keys.run, "create, list and revoke callers' API keys", config.ETCD, config.PREFIX)
    sub.add_argument("action", choices=("create", "list", "revoke"))
    sub.add_argument("key_id", nargs="?", help="the key to revoke")
    sub.add_argument("--tenant", action="append", help="a tenant the key may call ('*' = all); repeatable")
    sub.add_argument("--admin", action="store_true", help="also allow the router's admin API")
    sub.add_argument("--actor", default=None, help="who creates it (default: the OS user)")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("predict", client.predict, "call Predict through a router", config.ROUTER_ADDRESS,
                  config.API_KEY, config.TLS_CA, config.TLS_CERT, config.TLS_KEY)
    sub.add_argument("tenant")
    sub.add_argument("--features", required=True, help="comma-separated floats, row-major (nan allowed)")
    sub.add_argument("--version", default="", help="a registered version (default: the serving one)")
    sub.add_argument("--timeout", type=config.positive_seconds, default=10.0, help="deadline in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.configure(args.log_format, args.log_level)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that left early shows here, not as a complaint at exit
        return code
    except BrokenPipeError:  # `modelfleet status --once --json | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing stdout at exit
        return EXIT_BROKEN_PIPE
    except ModelfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_ERROR
    except (OSError, ValueError, OverflowError) as exc:  # a bad path, a port in use, a malformed file
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
