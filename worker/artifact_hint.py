"""The serving version's artifact digest, sent by routers with each request it applies to.

A router knows it from the tenant's route (`RouteRecord.serving_sha256`), which it holds in
memory anyway; with it a worker loads a model it has never seen without reading the version
record from etcd (a round trip that was most of a miss's cost beyond the parse, and etcd load
that grew with the miss rate). It travels in the request itself (`artifact_sha256` of
PredictRequest and WarmRequest): 64 lowercase hex digits, or empty. Not as metadata: one
metadata entry cost 13-19 µs of CPU per request to send and 19-23 µs to read on 2 cores
(`python -m loadtest.bench_transport`, unary against unary+md), a field next to nothing.
What a worker trusts it for is in worker.model_cache.
"""
from __future__ import annotations

import re

from modelfleet.errors import InvalidArgument

FIELD = "artifact_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def artifact_hint(request) -> str | None:
    """The digest a caller sent, None if it sent none; INVALID_ARGUMENT if it is malformed."""
    value = request.artifact_sha256
    if not value:
        return None
    if _SHA256.fullmatch(value) is None:
        raise InvalidArgument(f"{FIELD} must be a sha256 digest in lowercase hex, got {value!r:.80}")
    return value
