"""`modelfleet keys create | list | revoke`: callers' API keys (stored hashed in etcd)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from modelfleet.cli.admin import open_registry
from modelfleet.errors import InvalidArgument
from version_service import api_keys
from version_service.registry import default_actor

console = Console(highlight=False)


def run(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    client, keys = registry.client, registry.keys
    if args.action == "create":
        token, record = api_keys.create(client, keys, args.tenant or [], admin=args.admin,
                                        actor=args.actor or default_actor())
        if args.json:
            print(json.dumps({"key": token, **asdict(record)}))
        else:
            console.print(f"key {record.key_id} for {', '.join(record.tenants)}{' (admin)' if record.admin else ''};"
                          " it is shown only now:")
            print(token)
        return 0
    if args.action == "list":
        records = api_keys.list_keys(client, keys)
        if args.json:
            print(json.dumps([{k: v for k, v in asdict(r).items() if k != "sha256"} for r in records]))
            return 0
        table = Table(title=f"{len(records)} API keys")
        for column in ("key id", "tenants", "admin", "created", "by"):
            table.add_column(column)
        for r in records:
            table.add_row(r.key_id, ", ".join(r.tenants), "yes" if r.admin else "", r.created, r.actor)
        console.print(table)
        return 0
    if not args.key_id:
        raise InvalidArgument("keys revoke needs the key id (see `modelfleet keys list`)")
    api_keys.revoke(client, keys, args.key_id)
    console.print(f"key {args.key_id} revoked")
    return 0
