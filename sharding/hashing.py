"""The hashes behind rendezvous scoring, in one place so every caller scores alike.

A tenant's shard is decided by ``score(tenant, worker) = mix64(tenant_hash ^ worker_hash)``.
The per-request path (``shard_for``) computes it on Python ints and the fleet-wide path
(``fleet_shards``) on numpy ``uint64`` arrays; both must agree bit for bit, so the finaliser
is written twice here, side by side, from the same constants (tests check they agree).

Invariant: ``mix64`` is a bijection on 64-bit integers (xor-shifts and multiplications by odd
constants are each invertible mod 2**64). Hence, for a fixed tenant, two workers get equal
scores if and only if their ``worker_hash`` values are equal. Score ties therefore depend on
the member set alone, never on the tenant, which lets the vectorised path check for ties once
per member set instead of per tenant.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

MASK64 = (1 << 64) - 1

# murmur3 fmix64: full avalanche, so xor-ing two hashes (which alone would be a weak,
# linear combination) still yields independent-looking scores per (tenant, worker).
_SHIFT = 33
_C1 = 0xFF51AFD7ED558CCD
_C2 = 0xC4CEB9FE1A85EC53
_NP_SHIFT = np.uint64(_SHIFT)
_NP_C1 = np.uint64(_C1)
_NP_C2 = np.uint64(_C2)


def tenant_hash(tenant: str) -> int:
    """64-bit hash of a tenant id (xxh3 of its UTF-8 bytes)."""
    return xxhash.xxh3_64_intdigest(tenant.encode())


def worker_hash(worker_id: str) -> int:
    """64-bit hash of a worker id (xxh3 of its UTF-8 bytes)."""
    return xxhash.xxh3_64_intdigest(worker_id.encode())


def mix64(x: int) -> int:
    """murmur3 fmix64 on a Python int; masks to 64 bits so it matches the uint64 version."""
    x &= MASK64
    x ^= x >> _SHIFT
    x = (x * _C1) & MASK64
    x ^= x >> _SHIFT
    x = (x * _C2) & MASK64
    return x ^ (x >> _SHIFT)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """murmur3 fmix64 on a uint64 array, wrapping like ``mix64``. Returns a new array.

    numpy array arithmetic on uint64 wraps modulo 2**64 silently, which is exactly the
    masking ``mix64`` does by hand.
    """
    x = np.array(x, dtype=np.uint64, copy=True)
    x ^= x >> _NP_SHIFT
    x *= _NP_C1
    x ^= x >> _NP_SHIFT
    x *= _NP_C2
    x ^= x >> _NP_SHIFT
    return x


def scores(th: int, worker_hashes: Sequence[int]) -> list[int]:
    """``[mix64(th ^ wh) for wh in worker_hashes]``, inlined: this is the cold-lookup hot loop."""
    out: list[int] = []
    append = out.append
    for wh in worker_hashes:
        x = th ^ wh
        x ^= x >> _SHIFT
        x = (x * _C1) & MASK64
        x ^= x >> _SHIFT
        x = (x * _C2) & MASK64
        append(x ^ (x >> _SHIFT))
    return out


def tenant_hashes(tenants: Iterable[str], count: int = -1) -> np.ndarray:
    """``tenant_hash`` of many tenants as a uint64 array (for the vectorised path)."""
    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(t.encode()) for t in tenants), dtype=np.uint64, count=count)
