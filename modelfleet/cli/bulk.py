"""`modelfleet import MANIFEST`: bulk registration with progress, resumable by re-running."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from modelfleet.cli.admin import open_registry
from modelfleet.errors import FailedPrecondition, InvalidArgument
from version_service.bulk_import import RECORDS_PER_TXN, import_manifest, read_manifest
from version_service.registry import default_actor

console = Console(highlight=False, stderr=True)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.batch <= RECORDS_PER_TXN:
        raise InvalidArgument(f"--batch must be between 1 and {RECORDS_PER_TXN} (etcd allows 128 operations "
                              "per transaction)")
    registry = open_registry(args)
    rows = read_manifest(Path(args.manifest))
    columns = (TextColumn("{task.description:12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=args.json) as progress:
        tasks: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done)

        result = import_manifest(registry, rows, args.actor or default_actor(), on_progress, args.batch,
                                 args.reason or "import")
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        console.print(f"{result.rows} rows: {result.registered} registered, {result.already_registered} already "
                      f"registered; {result.artifacts} artifacts ({result.artifacts_new} new) in "
                      f"{result.artifact_seconds:.1f} s, registration {result.registration_seconds:.1f} s")
        for reason in result.rejected[:20]:
            console.print(f"[red]rejected[/red] {reason}")
    if result.rejected:
        raise FailedPrecondition(f"{len(result.rejected)} artifacts were rejected; their rows were not registered")
    return 0
