"""Throughput and size of the synthetic fleet generator (modelfleet.fleet_gen).

    python -m loadtest.bench_fleet_gen --tenants 10000 [--versions 1] [--templates 8] [--processes N]
                                       [--dir DIR] [--keep]

Generates a fleet into a temporary directory (or --dir), then prints models/s, bytes per model
(apparent and on disk, i.e. what `du` counts), the projection to 100k tenants, and
os.cpu_count(). Also renders models in memory only (no disk) to separate CPU from I/O cost.
The output is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightgbm
import numpy as np

from modelfleet import config, processes
from modelfleet.fleet_gen import generate_fleet, train_templates

TARGET_TENANTS = 100_000


def _disk_usage(root: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under root, like `du -b` and `du -B1`."""
    files = apparent = allocated = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            files += 1
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return files, apparent, allocated


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every bad value is a usage error (exit 2) before anything runs, not a traceback from
    generate_fleet after the render-only pass."""
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench_fleet_gen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=config.whole(1), default=10_000)
    ap.add_argument("--versions", type=config.whole(1), default=1)
    ap.add_argument("--templates", type=config.whole(1), default=8)
    ap.add_argument("--processes", type=config.whole(1), default=None, help="default: os.cpu_count()")
    ap.add_argument("--dir", type=Path, default=None, help="output directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated fleet")
    args = ap.parse_args(argv)
    if args.dir is not None and args.dir.exists() and not args.dir.is_dir():
        ap.error(f"--dir {args.dir} exists and is not a directory")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    print(f"python {platform.python_version()}, numpy {np.__version__}, lightgbm {lightgbm.__version__}, "
          f"os.cpu_count()={os.cpu_count()}")

    # CPU only: render without writing (one process).
    templates = train_templates(args.templates, 8, 0)
    n_cpu = 2_000
    t0 = time.perf_counter()
    rendered = sum(len(templates[i % len(templates)].render(0, i + 1, 1)) for i in range(n_cpu))
    cpu_s = time.perf_counter() - t0
    print(f"render only (1 process, no I/O): {n_cpu / cpu_s:,.0f} models/s, "
          f"{rendered / n_cpu / 1024:.1f} KiB/model")

    base = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    out = base / f"fleet-{args.tenants}"
    try:
        t0 = time.perf_counter()
        manifest = generate_fleet(out, args.tenants, templates=args.templates, versions=args.versions,
                                  processes=args.processes)
        wall = time.perf_counter() - t0
        models = args.tenants * args.versions
        files, apparent, allocated = _disk_usage(out)
        per_model_disk = (allocated - manifest.stat().st_size) / models
        print(f"generate_fleet: {args.tenants:,} tenants x {args.versions} versions = {models:,} models "
              f"in {wall:.1f} s -> {models / wall:,.0f} models/s "
              f"({args.processes or os.cpu_count()} processes)")
        print(f"  {files:,} files, {apparent / 2**20:,.1f} MiB apparent, {allocated / 2**20:,.1f} MiB on disk; "
              f"per model {apparent / files / 1024:.1f} KiB apparent, {per_model_disk / 1024:.1f} KiB on disk")
        scale = TARGET_TENANTS / args.tenants
        print(f"projected for {TARGET_TENANTS:,} tenants x {args.versions} versions: "
              f"{wall * scale / 60:.1f} min, {allocated * scale / 1e9:.2f} GB on disk "
              f"(targets: <= 10 min, <= 5 GB)")
        if args.keep:
            print(f"kept: {out} (manifest {manifest})")
    except (OSError, ValueError) as exc:  # a --dir that can't be written, a full disk: one line, exit 1
        sys.exit(f"error: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
