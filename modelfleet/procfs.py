"""What Linux /proc says about a process: resident memory and CPU time (benchmarks, tests).

Elsewhere (no /proc) both answer None, and callers print "-" or skip.
"""
from __future__ import annotations

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
