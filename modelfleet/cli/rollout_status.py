"""`modelfleet rollout T --status`: what the routers that see the tenant's current rollout counted.

Every router etcd lists is asked at once, under one deadline (--members-timeout): routers that
are down or hung cost that deadline once, not a timeout each, and are named as unanswered.

The route is read from etcd after the last answer, so no router can be ahead of it. A router
whose view lags it (it still holds another rollout, or an older revision of the route) is listed
apart with its own counts and left out of the sums: its counts belong to an earlier rollout, or
were made while it routed by an older route, and would skew the canary's error rate unseen.

The command exits 1 when a router did not answer or lags: the figures then leave it out, and a
script must not take them as the whole fleet's. Without etcd there is no router list and no
current rollout to judge the routers by: the command fails with etcd's one-line error
(`etcd at ... unavailable while listing routers`), exit 1, as every admin command does.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from modelfleet.cli.client import call_metadata, channel_credentials
from modelfleet.fanout import ask_all
from modelfleet.v1 import router_admin_pb2, router_admin_pb2_grpc
from router.rollout import ROLLOUT_FIELDS
from version_service.membership import list_routers
from version_service.schema import RouteRecord, RouterRecord, validate_id

Answer = router_admin_pb2.RolloutStatusResponse

COUNTS = ("serving_requests", "canary_requests", "serving_errors", "canary_errors", "shadow_requests",
          "shadow_errors", "shadow_dropped")


def ask_routers(args: argparse.Namespace, routers: Sequence[RouterRecord], tenant: str,
                timeout: float) -> tuple[list[Answer], dict[str, str]]:
    """Every router's Rollout answer, all asked at once with the same deadline: (answers,
    {router_id: why it did not answer} for the others)."""
    request = router_admin_pb2.RolloutStatusRequest(tenant_id=tenant)
    metadata = call_metadata(args)  # TLS and API key as `predict`

    def rollout(channel: grpc.Channel, deadline: float) -> grpc.Future:
        return router_admin_pb2_grpc.RouterAdminStub(channel).Rollout.future(request, timeout=deadline,
                                                                              metadata=metadata)

    answers, errors = ask_all({router.router_id: (router.address, rollout) for router in routers}, timeout,
                              channel_credentials(args))
    return list(answers.values()), {router_id: f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
                                    for router_id, exc in errors.items()}


def view(answer: Answer) -> dict:
    """The route as a router answered it, under RouteRecord's names."""
    return {"rollout_id": answer.rollout_id or None, "serving": answer.serving_version,
            "canary": answer.canary_version or None, "canary_percent": answer.canary_percent or None,
            "shadow": answer.shadow_version or None}


def lag(answer: Answer, route: RouteRecord, route_revision: int) -> str | None:
    """Why `answer`'s counts are not the current rollout's (etcd's `route`, written at
    `route_revision`), None when they are."""
    seen = view(answer)
    if not answer.revision and not answer.rollout_id and route.rollout_id:
        return "a router older than rollout ids: its counts cannot be told apart (upgrade it)"
    if any(seen[name] != getattr(route, name) for name in ROLLOUT_FIELDS):
        return f"on rollout {answer.rollout_id or 'none'}, etcd's is {route.rollout_id or 'none'}"
    if answer.revision < route_revision:
        return f"routing revision {answer.revision} is older than the route's {route_revision}"
    if seen["serving"] != route.serving:  # its counts compare the canary with another serving version
        return f"serves {answer.serving_version}, etcd's route serves {route.serving}"
    return None


def figures(answers: Sequence[Answer]) -> dict:
    """The counts of `answers` summed; shadow latency percentiles and |diff| merged over them."""
    latencies = np.array([ms for a in answers for ms in a.shadow_latency_ms])
    diffs = [(a.shadow_mean_abs_diff, a.shadow_requests - a.shadow_errors) for a in answers]
    compared = sum(n for _, n in diffs)
    return {
        **{name: sum(getattr(a, name) for a in answers) for name in COUNTS},
        "shadow_p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "shadow_p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        # None, not 0, while no copy was compared (all failed, or none sent): 0 would read as "agrees exactly"
        "shadow_max_abs_diff": max(a.shadow_max_abs_diff for a in answers) if compared else None,
        "shadow_mean_abs_diff": (sum(m * n for m, n in diffs) / compared) if compared else None,
    }


def lagging_row(answer: Answer, why: str) -> dict:
    """A lagging router as listed apart: its view of the route and its own counts."""
    return {"router_id": answer.router_id, "why": why, "revision": answer.revision, **view(answer),
            **{name: getattr(answer, name) for name in COUNTS}}


def status(args: argparse.Namespace, registry) -> int:
    tenant = validate_id("tenant id", args.tenant)
    answers, unanswered = ask_routers(args, list_routers(registry.client, registry.keys), tenant,
                                      args.members_timeout)
    route, route_revision = registry.route(tenant)  # after the answers: no router is ahead of it
    current, lagging = [], []
    for answer in sorted(answers, key=lambda a: a.router_id):
        why = lag(answer, route, route_revision)
        (current.append(answer) if why is None else lagging.append(lagging_row(answer, why)))
    for router_id, why in unanswered.items():
        print(f"router {router_id} did not answer: {why}", file=sys.stderr)
    summary = {
        "tenant": tenant, "serving": route.serving, "canary": route.canary, "canary_percent": route.canary_percent,
        "shadow": route.shadow, "rollout_id": route.rollout_id, "route_revision": route_revision,
        "routers": len(current), "routers_unanswered": sorted(unanswered), "routers_lagging": lagging,
        **figures(current),
    }
    incomplete = 1 if unanswered or lagging else 0  # the figures leave those routers out
    if args.json:
        print(json.dumps(summary))
        return incomplete
    render(summary, unanswered)
    return incomplete


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render(summary: dict, unanswered: dict[str, str]) -> None:
    console = Console(highlight=False)  # made here: it takes the terminal's width as it is now
    table = Table(title=f"{summary['tenant']}: rollout status over the {summary['routers']} router(s) on "
                        f"the current rollout")
    table.add_column("measure")
    table.add_column("value")
    for key, value in summary.items():
        if key == "routers_unanswered":
            table.add_row(key, ", ".join(f"{r} ({unanswered[r].split(':')[0]})" for r in value))
        elif key == "routers_lagging":
            table.add_row(key, ", ".join(row["router_id"] for row in value))
        elif key != "tenant":
            table.add_row(key, _cell(value))
    console.print(table)
    if summary["routers_lagging"]:
        lagging = Table(title="routers that lag etcd: their counts, left out of the figures above")
        columns = ("router_id", "why", "canary", "canary_percent", "shadow", *COUNTS)
        for column in columns:
            lagging.add_column(column)
        for row in summary["routers_lagging"]:
            lagging.add_row(*(_cell(row[column]) for column in columns))
        console.print(lagging)
