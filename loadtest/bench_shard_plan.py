"""Fleet-wide planning costs: isolation reports and change plans.

    python -m loadtest.bench_shard_plan

Times ``isolation_report`` and ``plan_change`` (add one worker, drain one, set 1000 tenants'
shard sizes) for 100,000 tenants x 64 workers, k=3, in one zone and in three, and prints a
table of best / median wall seconds over a few repetitions, with ``os.cpu_count()``. All of
it is single-threaded numpy; runs in well under a minute.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from loadtest.cli import describe_only
from sharding.member import Member
from sharding.plan import FleetChange, plan_change
from sharding.report import isolation_report, simulated_fleet

TENANTS = 100_000
WORKERS = 64
K = 3
REPEATS = 3


def _time(fn: Callable[[], object]) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), result


def main() -> None:
    describe_only(__doc__)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(f"python {platform.python_version()}, numpy {np.__version__}, "
                  f"os.cpu_count()={os.cpu_count()}; {TENANTS:,} tenants x {WORKERS} workers, k={K}, "
                  f"best / median of {REPEATS}")
    table = Table(title="shard plans and isolation reports")
    for col in ("zones", "operation", "best s", "median s", "result"):
        table.add_column(col, justify="right" if col.endswith(" s") else "left")

    for zones in (1, 3):
        tenants, members = simulated_fleet(WORKERS, TENANTS, zones)
        rng = np.random.default_rng(0)
        resized = tuple((tenants[i], int(rng.integers(1, 6)))
                        for i in rng.choice(TENANTS, 1000, replace=False).tolist())
        best, med, r = _time(lambda: isolation_report(tenants, members, K))
        table.add_row(str(zones), "isolation_report", f"{best:.3f}", f"{med:.3f}",
                      f"identical {r['identical_shard_fraction']:.2e} (theory {r['identical_shard_fraction_theory']:.2e}), "
                      f"moved {r['moved_fraction_add_one']:.4f}, max/mean {r['tenants_per_worker_max_over_mean']:.3f}")
        for label, change in (
            ("plan_change: add one worker", FleetChange(add=(Member("worker-new", members[0].zone),))),
            ("plan_change: drain one worker", FleetChange(drain=(members[7].worker_id,))),
            ("plan_change: set 1000 sizes", FleetChange(set_size=resized)),
        ):
            best, med, p = _time(lambda: plan_change(tenants, members, (), {}, K, change))
            table.add_row(str(zones), label, f"{best:.3f}", f"{med:.3f}",
                          f"moved {p.moved_placements:,} / {p.placements_before:,}, warm-ups {len(p.warmups):,}")
    console.print(table)
    console.print("theory assumes uniformly random shards (one zone); with zones shards are zone-balanced, "
                  "so fewer distinct shards exist and the identical fraction is higher")


if __name__ == "__main__":
    main()
