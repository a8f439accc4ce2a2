"""Running a server's main coroutine on the event loop its `--event-loop` names.

uvloop by default: a router or worker spends much of each request in the event loop itself
(scheduling callbacks, the selector, futures), and uvloop's libuv loop does that work in C.
Measured on 2 cores, `python -m loadtest.bench` warm and zipf10k cells, interleaved runs: the
router's CPU per request fell ~50-60 µs (~620 -> ~570 µs), the worker's ~35-50 µs
(~410-460 -> ~375-410 µs). grpc.aio runs on any asyncio loop (it wakes the loop through a
socket, not through loop internals); the whole test suite runs on uvloop. `asyncio` keeps the
standard library's loop, for a platform without uvloop or to rule the loop out.
"""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """`asyncio.run(main)` on the named loop ('uvloop' or 'asyncio')."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise SystemExit("error: --event-loop uvloop: uvloop is not installed "
                             "(pip install uvloop, or pass --event-loop asyncio)") from None
        return uvloop.run(main)
    return asyncio.run(main)


def running_loop_name() -> str:
    """'uvloop' or 'asyncio': which loop this coroutine runs on (for the serving event)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
