"""Failpoints: named places where a test can hold a real process (like etcd's gofail).

Inert unless MODELFLEET_FAILPOINT_DIR is set. When it is, `pause("name")` writes
`<dir>/name.<pid>.ready` and waits (up to 60 s) for `<dir>/name.go`: a test can make two real
CLI processes read the same revision before either writes, and prove the compare-and-swap.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "MODELFLEET_FAILPOINT_DIR"


def pause(name: str, timeout: float = 60.0) -> None:
    directory = os.environ.get(ENV)
    if not directory:
        return
    root = Path(directory)
    (root / f"{name}.{os.getpid()}.ready").touch()
    deadline = time.monotonic() + timeout
    while not (root / f"{name}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
