"""`modelfleet demo-fleet`: a synthetic fleet of distinct, valid models and its manifest."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from modelfleet.errors import FailedPrecondition, InvalidArgument
from modelfleet.fleet_gen import generate_fleet

console = Console(highlight=False, stderr=True)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:  # its files would be overwritten, a manifest mixed
        raise FailedPrecondition(f"{out} is not empty: give an empty or new directory, or --force to write over "
                                 f"what is there")
    columns = (TextColumn("demo-fleet"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("generate", total=args.tenants * args.versions)
        try:
            manifest = generate_fleet(Path(args.out), args.tenants, templates=args.templates, versions=args.versions,
                                      manifest_format=args.format,
                                      on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                      total=total))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    print(manifest)
    console.print(f"register them with: modelfleet import {manifest}")
    return 0
