"""RESOURCE_EXHAUSTED with a retry hint: the one shape every "too much, come back later" takes.

A caller that is shed (a worker's load queue is full, a tenant is over its quota on a router)
gets RESOURCE_EXHAUSTED, the hint in the message for people, and the same hint in trailing
metadata `retry-after-ms` for programs. A RESOURCE_EXHAUSTED *without* the hint means something
retrying will not fix (a model larger than a worker's whole cache), so the router fails over on
the first kind only.
"""
from __future__ import annotations

import grpc

from modelfleet.errors import ResourceExhausted

RETRY_AFTER_KEY = "retry-after-ms"


class RetryLater(ResourceExhausted):
    """Shed load: the message says why and when to retry; `retry_after_ms` is the hint."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        self.retry_after_ms = max(1, int(retry_after_ms))
        super().__init__(f"{message}; retry after {self.retry_after_ms} ms")


def set_retry_hint(context: grpc.aio.ServicerContext, error: RetryLater) -> None:
    """Puts the hint in the trailing metadata (kept by the abort that follows)."""
    context.set_trailing_metadata(((RETRY_AFTER_KEY, str(error.retry_after_ms)),))


def retry_hint(metadata) -> int | None:
    """`retry-after-ms` from a call's trailing metadata, or None when there is none."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None
