"""`modelfleet status`: the fleet at a glance, refreshing until Ctrl-C; `--once --json` for scripts.

Workers and routers are found in etcd (both register under leases) and asked directly
(Worker.Stats, RouterAdmin.Status), all at once under one deadline (--members-timeout), so a few
hung members stall a refresh by that deadline once, not by a timeout each. Rates come from the
difference of two snapshots, so the first screen shows totals and the next ones requests per
second and hit rates.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from modelfleet.cli.admin import open_registry
from modelfleet.cli.client import call_metadata, channel_credentials
from modelfleet.fanout import ask_all
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from version_service.membership import list_routers, read_fleet


@dataclass
class Snapshot:
    at: float
    workers: dict[str, dict] = field(default_factory=dict)
    routers: dict[str, dict] = field(default_factory=dict)


def snapshot(args: argparse.Namespace, registry) -> Snapshot:
    """Every worker (Stats) and router (Status) etcd lists, all asked at once under one deadline
    (--members-timeout): hung members cost it once per refresh, not once each, and show the
    reason they did not answer (DEADLINE_EXCEEDED, UNAVAILABLE, UNAUTHENTICATED...)."""
    metadata = call_metadata(args)  # the API key goes to routers only, as `predict` sends it

    def worker_stats(channel: grpc.Channel, deadline: float) -> grpc.Future:
        return worker_pb2_grpc.WorkerStub(channel).Stats.future(worker_pb2.StatsRequest(), timeout=deadline)

    def router_status(channel: grpc.Channel, deadline: float) -> grpc.Future:
        return router_admin_pb2_grpc.RouterAdminStub(channel).Status.future(
            router_admin_pb2.RouterStatusRequest(), timeout=deadline, metadata=metadata)

    workers, drains = read_fleet(registry.client, registry.keys)
    routers = list_routers(registry.client, registry.keys)
    snap = Snapshot(at=time.monotonic())
    answers, errors = ask_all({**{("worker", w): (record.address, worker_stats) for w, record in workers.items()},
                               **{("router", r.router_id): (r.address, router_status) for r in routers}},
                              args.members_timeout, channel_credentials(args))
    for worker_id, record in sorted(workers.items()):
        row = {"worker_id": worker_id, "address": record.address, "zone": record.zone,
               "state": "drained" if worker_id in drains else "joining" if record.joining else "live"}
        if (exc := errors.get(("worker", worker_id))) is not None:
            row["error"] = exc.code().name  # type: ignore[attr-defined]
        else:
            stats = answers[("worker", worker_id)]
            row.update(models=stats.models_loaded, bytes_used=stats.bytes_used, bytes_budget=stats.bytes_budget,
                       requests=stats.requests_total, predictions=stats.predictions_total, hits=stats.hits_total,
                       misses=stats.misses_total,
                       loads=stats.loads_total, evictions=stats.evictions_total,
                       load_failures=stats.load_failures_total, shed=stats.shed_total,
                       negative_hits=stats.negative_cache_hits_total,
                       admission_rejections=stats.admission_rejections_total,
                       artifact_mismatches=stats.artifact_mismatches_total)
        snap.workers[worker_id] = row
    for router in routers:
        row = {"router_id": router.router_id, "address": router.address}
        if (exc := errors.get(("router", router.router_id))) is not None:
            row["error"] = exc.code().name  # type: ignore[attr-defined]
        else:
            status = answers[("router", router.router_id)]
            row.update(revision=status.revision, tenants=status.tenants, live_workers=status.live_workers,
                       etcd_connected=status.etcd_connected, seconds_since_change=round(status.seconds_since_change, 1))
        snap.routers[router.router_id] = row
    return snap


def with_rates(now: Snapshot, before: Snapshot | None) -> Snapshot:
    for worker_id, row in now.workers.items():
        old = before.workers.get(worker_id) if before else None
        if old and "requests" in row and "requests" in old:
            elapsed = max(now.at - before.at, 1e-6)
            row["rps"] = round((row["requests"] - old["requests"]) / elapsed, 1)  # answered or not
            failed = (row["requests"] - row["predictions"]) - (old["requests"] - old["predictions"])
            row["errors_per_s"] = round(failed / elapsed, 1)
            lookups = (row["hits"] - old["hits"]) + (row["misses"] - old["misses"])
            row["hit_rate"] = round((row["hits"] - old["hits"]) / lookups, 4) if lookups else None
        elif "hits" in row:
            lookups = row["hits"] + row["misses"]
            row["hit_rate"] = round(row["hits"] / lookups, 4) if lookups else None
    return now


def _evictions(row: dict) -> str:
    """Evictions, and how many of them were loads the cache refused to keep (worker.tinylfu_cache)."""
    refused = row.get("admission_rejections", 0)
    return f"{row['evictions']} ({refused} refused)" if refused else str(row["evictions"])


def render(snap: Snapshot) -> Group:
    workers = Table(title=f"{len(snap.workers)} workers")
    for column in ("worker", "zone", "state", "models", "MB used / budget", "req/s", "err/s", "hit rate", "loads",
                   "evictions", "load failures", "failed-load hits", "shed"):
        workers.add_column(column)
    for row in snap.workers.values():
        if "error" in row:
            workers.add_row(row["worker_id"], row["zone"], row["state"], f"[red]{row['error']}[/red]")
            continue
        workers.add_row(row["worker_id"], row["zone"], row["state"], str(row["models"]),
                        f"{row['bytes_used'] / 2**20:.1f} / {row['bytes_budget'] / 2**20:.0f}",
                        str(row.get("rps", "")), str(row.get("errors_per_s", "")),
                        "" if row.get("hit_rate") is None else f"{row['hit_rate']:.1%}",
                        str(row["loads"]), _evictions(row), str(row["load_failures"]), str(row["negative_hits"]),
                        str(row["shed"]))
    routers = Table(title=f"{len(snap.routers)} routers")
    for column in ("router", "address", "routing revision", "tenants", "live workers", "etcd", "last change s"):
        routers.add_column(column)
    for row in snap.routers.values():
        if "error" in row:
            routers.add_row(row["router_id"], row["address"], f"[red]{row['error']}[/red]")
            continue
        routers.add_row(row["router_id"], row["address"], str(row["revision"]), str(row["tenants"]),
                        str(row["live_workers"]), "connected" if row["etcd_connected"] else "[red]away[/red]",
                        str(row["seconds_since_change"]))
    return Group(workers, routers)


def run(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    if args.once:
        snap = with_rates(snapshot(args, registry), None)
        if args.json:
            print(json.dumps({"workers": list(snap.workers.values()), "routers": list(snap.routers.values())}))
        else:
            Console().print(render(snap))
        # A script must not read a fleet with an unanswering member as healthy (as rollout --status).
        return 1 if any("error" in row for row in (*snap.workers.values(), *snap.routers.values())) else 0
    before = None
    with Live(console=Console(), refresh_per_second=4, screen=False) as live:
        while True:
            now = with_rates(snapshot(args, registry), before)
            live.update(render(now))
            before = now
            time.sleep(args.interval)  # the refresh period of a live view, not synchronisation
