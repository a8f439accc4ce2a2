"""Admin subcommands: registry writes and fleet reads, straight against etcd."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from modelfleet.store import LocalStore
from sharding import Member, shard_for
from version_service.etcd_client import connect
from version_service.membership import list_workers
from version_service.registry import Registry
from version_service.schema import Keys

console = Console(highlight=False)


def open_registry(args: argparse.Namespace) -> Registry:
    store = LocalStore(args.store) if getattr(args, "store", None) else None
    return Registry(connect(args.etcd), Keys(args.prefix), store)


def register(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    record, created = registry.register(args.tenant, args.version, args.model_file)
    route, _ = registry.route(args.tenant)
    state = "registered" if created else "already registered (same sha256)"
    console.print(f"{args.tenant} {record.version} {state}: {record.num_features} features, "
                  f"{record.num_classes} output(s), sha256 {record.sha256[:12]}..., serving {route.serving}"
                  f"{' (pinned)' if route.pinned else ''}")
    return 0


def pin(args: argparse.Namespace) -> int:
    route = open_registry(args).pin(args.tenant, args.version)
    console.print(f"{args.tenant} pinned to {route.serving}")
    return 0


def unpin(args: argparse.Namespace) -> int:
    route = open_registry(args).unpin(args.tenant)
    console.print(f"{args.tenant} unpinned: serving newest version {route.serving}")
    return 0


def versions(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    route, _ = registry.route(args.tenant)
    records = registry.versions(args.tenant)
    if args.json:
        print(json.dumps({"tenant": args.tenant, "route": asdict(route), "versions": [asdict(r) for r in records]}))
        return 0
    table = Table(title=f"{args.tenant}: serving {route.serving}{' (pinned)' if route.pinned else ''}")
    for column in ("version", "state", "features", "outputs", "bytes", "sha256", "created"):
        table.add_column(column)
    for r in records:
        state = ", ".join(s for s, on in (("serving", r.version == route.serving), ("newest", r.version == route.newest),
                                          ("pinned", route.pinned and r.version == route.serving)) if on)
        table.add_row(r.version, state, str(r.num_features), str(r.num_classes), str(r.bytes), r.sha256[:12], r.created)
    console.print(table)
    return 0


def shard(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    route, _ = registry.route(args.tenant)
    workers = list_workers(registry.client, registry.keys)
    by_id = {w.worker_id: w for w in workers}
    live = [Member(w.worker_id, w.zone) for w in workers if not w.draining]
    k = route.shard_size or args.shard_size
    members = shard_for(args.tenant, live, k)
    if args.json:
        print(json.dumps({"tenant": args.tenant, "shard_size": k,
                          "workers": [asdict(by_id[m]) for m in members]}))
        return 0
    console.print(f"{args.tenant}: shard of {k} over {len(live)} live workers")
    for position, worker_id in enumerate(members, 1):
        w = by_id[worker_id]
        console.print(f"  {position}. {w.worker_id}  {w.address}  zone={w.zone}")
    return 0


def workers(args: argparse.Namespace) -> int:
    client = connect(args.etcd)
    records = list_workers(client, Keys(args.prefix))
    if args.json:
        print(json.dumps([asdict(w) for w in records]))
        return 0
    table = Table(title=f"{len(records)} workers")
    for column in ("worker", "address", "zone", "draining", "started"):
        table.add_column(column)
    for w in records:
        table.add_row(w.worker_id, w.address, w.zone, "yes" if w.draining else "", w.started)
    console.print(table)
    return 0
