"""What Linux says about a process: resident memory and CPU time from /proc (benchmarks,
tests), and the cores it may use (a worker's default load threads and malloc arenas).

Elsewhere (no /proc) the first two answer None, and callers print "-" or skip.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path


def rss_bytes(pids: Iterable[int | str] = ("self",)) -> int | None:
    """Resident memory of the processes now, summed, in bytes."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return None
    return total


def cpu_seconds(pids: Iterable[int | str]) -> float | None:
    """User + system CPU seconds the processes have used so far, summed."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def usable_cores(cgroup: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota.

    `os.cpu_count()` counts the machine's cores: a pod limited to 2 CPUs on a 64-core node sees
    64, and sizing thread pools by that oversubscribes the 2 it gets (the kernel throttles it).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota(Path(cgroup))
    return max(1, min(cores, math.ceil(quota))) if quota is not None else max(1, cores)


def _cpu_quota(root: Path) -> float | None:
    """CPUs the cgroup may use per period (cgroup v2 `cpu.max`, else v1 `cpu.cfs_*`); None if
    unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
