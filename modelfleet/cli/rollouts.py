"""`modelfleet rollout`: canary and shadow rollouts, promote, abort; `--status` is rollout_status."""
from __future__ import annotations

import argparse

from rich.console import Console

from modelfleet.cli.admin import open_registry
from modelfleet.cli.rollout_status import status
from modelfleet.errors import InvalidArgument

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
