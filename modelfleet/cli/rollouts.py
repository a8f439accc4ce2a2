"""`modelfleet rollout`: canary and shadow rollouts, promote, abort, and a fleet-wide status."""
from __future__ import annotations

import argparse
import json
import sys

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from modelfleet.cli.admin import open_registry
from modelfleet.cli.client import call_metadata, router_channel
from modelfleet.errors import InvalidArgument
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc
from version_service.membership import list_routers

console = Console(highlight=False)


def rollout(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    if args.status:
        return status(args, registry)
    if args.promote or args.abort:
        if args.version:
            raise InvalidArgument("--promote and --abort act on the tenant's current rollout: give no version")
        route = (registry.promote if args.promote else registry.abort)(args.tenant, args.actor, args.reason)
        console.print(f"{args.tenant}: rollout {'promoted' if args.promote else 'aborted'}; serving {route.serving}")
        return 0
    if not args.version or (args.percent is None and not args.shadow):
        raise InvalidArgument("start a rollout with VERSION and --percent P or --shadow; "
                              "or give --promote, --abort or --status")
    route = registry.start_rollout(args.tenant, args.version, percent=args.percent, shadow=args.shadow,
                                   actor=args.actor, reason=args.reason)
    what = f"shadow of {route.shadow}" if args.shadow else f"canary {route.canary} at {route.canary_percent:g}%"
    console.print(f"{args.tenant}: {what}; serving {route.serving}")
    return 0


def status(args: argparse.Namespace, registry) -> int:
    route, _ = registry.route(args.tenant)
    per_router, unanswered = [], []
    for router in list_routers(registry.client, registry.keys):
        try:
            with router_channel(args, router.address) as channel:  # TLS and the API key as `predict` sends them
                per_router.append(router_admin_pb2_grpc.RouterAdminStub(channel).Rollout(
                    router_admin_pb2.RolloutStatusRequest(tenant_id=args.tenant), timeout=5,
                    metadata=call_metadata(args)))
        except grpc.RpcError as exc:
            unanswered.append(router.router_id)
            print(f"router {router.router_id} did not answer: {exc.code().name}: {exc.details()}", file=sys.stderr)
    latencies = np.array([ms for r in per_router for ms in r.shadow_latency_ms]) if per_router else np.array([])
    diffs = [(r.shadow_mean_abs_diff, r.shadow_requests - r.shadow_errors) for r in per_router]
    compared = sum(n for _, n in diffs)
    summary = {
        "tenant": args.tenant, "serving": route.serving, "canary": route.canary,
        "canary_percent": route.canary_percent, "shadow": route.shadow, "routers": len(per_router),
        "routers_unanswered": unanswered,
        "serving_requests": sum(r.serving_requests for r in per_router),
        "canary_requests": sum(r.canary_requests for r in per_router),
        "serving_errors": sum(r.serving_errors for r in per_router),
        "canary_errors": sum(r.canary_errors for r in per_router),
        "shadow_requests": sum(r.shadow_requests for r in per_router),
        "shadow_errors": sum(r.shadow_errors for r in per_router),
        "shadow_dropped": sum(r.shadow_dropped for r in per_router),
        "shadow_p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "shadow_p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        # None, not 0, while no copy was compared (all failed, or none sent): 0 would read as "agrees exactly"
        "shadow_max_abs_diff": max(r.shadow_max_abs_diff for r in per_router) if compared else None,
        "shadow_mean_abs_diff": (sum(m * n for m, n in diffs) / compared) if compared else None,
    }
    incomplete = 1 if unanswered else 0  # the figures leave those routers out: a script must not take them as whole
    if args.json:
        print(json.dumps(summary))
        return incomplete
    table = Table(title=f"{args.tenant}: rollout status over {len(per_router)} routers")
    table.add_column("measure")
    table.add_column("value")
    for key, value in summary.items():
        if key != "tenant":
            shown = ", ".join(value) if isinstance(value, list) else value
            table.add_row(key, "" if shown is None else f"{shown:.4g}" if isinstance(shown, float) else str(shown))
    console.print(table)
    return incomplete
