"""Admin subcommands: registry writes and fleet reads, straight against etcd."""
from __future__ import annotations

import argparse
import json
from typing import Callable
from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelfleet.cli.shards import fleet_shard_size
from modelfleet.errors import InvalidArgument
from modelfleet.store import open_store
from sharding import shard_for
from version_service.etcd_client import connect_args
from version_service.membership import read_fleet
from version_service.registry import Registry
from version_service.schema import Keys, canary_percent, live_members

console = Console(highlight=False)


def open_registry(args: argparse.Namespace) -> Registry:
    store = open_store(args.store, endpoint_url=getattr(args, "s3_endpoint", "") or None) \
        if getattr(args, "store", None) else None
    return Registry(connect_args(args), Keys(args.prefix), store)


def register(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    try:
        record, created = registry.register(args.tenant, args.version, args.model_file, actor=args.actor,
                                            reason=args.reason)
    finally:
        registry.close()  # the checker's child exits with this command, not after it
    route, _ = registry.route(args.tenant)
    state = "registered" if created else "already registered (same sha256)"
    console.print(f"{args.tenant} {record.version} {state}: {record.num_features} features, "
                  f"{record.num_classes} output(s), sha256 {record.sha256[:12]}..., serving {route.serving}"
                  f"{' (pinned)' if route.pinned else ''}")
    return 0


def pin(args: argparse.Namespace) -> int:
    route = open_registry(args).pin(args.tenant, args.version, args.actor, args.reason)
    console.print(f"{args.tenant} pinned to {route.serving}")
    return 0


def unpin(args: argparse.Namespace) -> int:
    route = open_registry(args).unpin(args.tenant, args.actor, args.reason)
    console.print(f"{args.tenant} unpinned: serving newest version {route.serving}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    route = open_registry(args).rollback(args.tenant, args.actor, args.reason)
    console.print(f"{args.tenant} rolled back: serving {route.serving} (pinned)")
    return 0


def set_shard_size(args: argparse.Namespace) -> int:
    """Shortcut for a size change without warm-up (`shards apply --set-size` warms first)."""
    route = open_registry(args).set_shard_size(args.tenant, args.size)
    console.print(f"{args.tenant} shard size: {route.shard_size or 'default'}")
    return 0


def set_limits(args: argparse.Namespace) -> int:
    """Changes only the limits given ('default' = the routers' own); none given: shows them."""
    changes = {name: value for name, value in (("rate_limit", args.rate), ("burst", args.burst),
                                               ("max_inflight", args.max_inflight)) if value is not KEEP}
    registry = open_registry(args)
    route = registry.change_limits(args.tenant, changes) if changes else registry.route(args.tenant)[0]
    limits = {"tenant": args.tenant, "rate_limit": route.rate_limit, "burst": route.burst,
              "max_inflight": route.max_inflight}
    if args.json:
        print(json.dumps(limits))
    else:
        shown = ", ".join(f"{name} {'default' if value is None else f'{value:g}'}"
                          for name, value in list(limits.items())[1:])
        console.print(f"{args.tenant} limits per router: {shown}")
    return 0


KEEP = object()  # a limit flag not given: leave that limit as it is


def limit_value(kind: type) -> Callable[[str], object]:
    """argparse type for a limit: a number of `kind`, or 'default' (None: the routers' default)."""
    def parse(text: str) -> object:
        if text == "default":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'default', got {text!r}") from None
    return parse


def canary_percent_value(text: str) -> float:
    """argparse type of `rollout --percent`: 0.01 to 100, to the nearest 0.01 (what routers apply)."""
    try:
        return canary_percent(float(text))
    except (ValueError, InvalidArgument):
        raise argparse.ArgumentTypeError(f"expected a percentage from 0.01 to 100 (to 0.01), got {text!r}") from None


def versions(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    route, _ = registry.route(args.tenant)
    records = registry.versions(args.tenant)
    history = registry.history(args.tenant) if args.history else []
    if args.json:
        doc = {"tenant": args.tenant, "route": asdict(route), "versions": [asdict(r) for r in records]}
        if args.history:
            doc["history"] = [asdict(h) for h in history]
        print(json.dumps(doc))
        return 0
    table = Table(title=f"{args.tenant}: serving {route.serving}{' (pinned)' if route.pinned else ''}")
    for column in ("version", "state", "features", "outputs", "bytes", "sha256", "created"):
        table.add_column(column)
    for r in records:
        states = [s for s, on in (("serving", r.version == route.serving), ("newest", r.version == route.newest),
                                  ("pinned", route.pinned and r.version == route.serving),
                                  (f"canary {route.canary_percent or 0:g}%", r.version == route.canary),
                                  ("shadow", r.version == route.shadow)) if on]
        table.add_row(r.version, ", ".join(states), str(r.num_features), str(r.num_classes), str(r.bytes),
                      r.sha256[:12], r.created)
    console.print(table)
    if args.history:
        table = Table(title=f"{args.tenant}: history")
        for column in ("when", "who", "action", "from", "to", "reason"):
            table.add_column(column)
        for h in history:
            # escaped: an actor or reason is anyone's text (an older tool's, the Python API's), not markup
            table.add_row(h.at, escape(h.actor), h.action, h.from_version, h.to_version, escape(h.reason))
        console.print(table)
    return 0


def shard(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    route, _ = registry.route(args.tenant)
    workers, drains = read_fleet(registry.client, registry.keys)
    live = live_members(workers, drains)
    k = route.shard_size or fleet_shard_size(registry.client, registry.keys, args.shard_size)
    members = shard_for(args.tenant, live, k)
    if args.json:
        print(json.dumps({"tenant": args.tenant, "shard_size": k, "short": len(members) < k,
                          "workers": [asdict(workers[m]) for m in members]}))
        return 0
    short = f" (only {len(members)} live: the shard is all of them)" if len(members) < k else ""
    console.print(f"{args.tenant}: shard of {k} over {len(live)} live workers{short}")
    for position, worker_id in enumerate(members, 1):
        w = workers[worker_id]
        console.print(f"  {position}. {w.worker_id}  {w.address}  zone={w.zone}")
    return 0


def workers(args: argparse.Namespace) -> int:
    client = connect_args(args)
    records, drains = read_fleet(client, Keys(args.prefix))
    rows = [{**asdict(w), "drained": w.worker_id in drains,
             "state": "drained" if w.worker_id in drains else "joining" if w.joining else "live"}
            for w in sorted(records.values(), key=lambda w: w.worker_id)]
    for row in rows:  # who drained it, when and why
        if row["drained"]:
            row["drain"] = asdict(drains[row["worker_id"]])
    # A drain outlives its worker's process (it is not leased): shown, so it can be lifted
    # before the worker comes back drained.
    rows += [{"worker_id": w, "address": "", "zone": "", "started": "", "drained": True,
              "state": "drained (not running)", "drain": asdict(drains[w])} for w in sorted(set(drains) - set(records))]
    if getattr(args, "json", False):
        print(json.dumps(rows))
        return 0
    table = Table(title=f"{len(records)} workers")
    for column in ("worker", "address", "zone", "state", "started"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["worker_id"], row["address"], row["zone"], row["state"], row["started"])
    console.print(table)
    for row in rows:  # below the table: a reason of up to 200 characters would crush its columns
        if row["drained"]:
            drain = row["drain"]
            console.print(f"{row['worker_id']} drained since {drain['since']} by {escape(drain['actor'] or '?')}: "
                          f"{escape(drain['reason'] or '(no reason given)')}", soft_wrap=True)
    return 0


def gc(args: argparse.Namespace) -> int:
    """Dry run unless --yes: prints what would go."""
    from version_service.retention import apply_gc, plan_gc, remove_tombstones

    registry = open_registry(args)
    plan = plan_gc(registry, args.keep, args.tenant, args.tombstone_days)
    doc = plan.to_json()
    if args.yes:
        removed, deleted, skipped = apply_gc(registry, plan)
        doc.update(applied=True, removed_versions=removed, deleted_artifacts=deleted, skipped_tenants=skipped,
                   removed_tombstones=remove_tombstones(registry, plan))
    else:
        doc["applied"] = False
    if args.json:
        print(json.dumps(doc))
        return 0
    for tenant, versions in doc["removals"].items():
        console.print(f"  {tenant}: {' '.join(versions)}")
    verb = "removed" if args.yes else "would remove"
    tombstones = doc.get("removed_tombstones", len(plan.tombstones))
    console.print(f"{verb} {plan.versions} versions, {len(plan.artifacts)} artifacts and {tombstones} tombstones "
                  f"over {args.tombstone_days:g} days old; kept {plan.kept_versions}"
                  + ("" if args.yes else " (dry run: add --yes to delete)"))
    if args.yes and doc["skipped_tenants"]:
        console.print(f"[yellow]skipped (changed meanwhile): {', '.join(doc['skipped_tenants'])}[/yellow]")
    return 0
