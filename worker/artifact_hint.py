"""The serving version's artifact digest, sent by routers with each request it applies to.

A router knows it from the tenant's route (`RouteRecord.serving_sha256`), which it holds in
memory anyway; with it a worker loads a model it has never seen without reading the version
record from etcd (a round trip that was most of a miss's cost beyond the parse, and etcd load
that grew with the miss rate). It travels as request metadata `x-modelfleet-artifact`: 64
lowercase hex digits. What a worker trusts it for is in worker.model_cache.
"""
from __future__ import annotations

import re

import grpc

from modelfleet.errors import InvalidArgument

ARTIFACT_KEY = "x-modelfleet-artifact"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def artifact_metadata(sha256: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a router adds to a forwarded request: none without a digest."""
    return ((ARTIFACT_KEY, sha256),) if sha256 else ()


def artifact_hint(context: grpc.aio.ServicerContext) -> str | None:
    """The digest a caller sent, None if it sent none; INVALID_ARGUMENT if it is malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == ARTIFACT_KEY:
            if not isinstance(value, str) or _SHA256.fullmatch(value) is None:
                raise InvalidArgument(f"{ARTIFACT_KEY} must be a sha256 digest in lowercase hex, got {value!r:.80}")
            return value
    return None
