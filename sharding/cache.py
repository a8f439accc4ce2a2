"""A per-tenant memo of ``shard_for`` for the router's hot path.

A hit is one attribute read and one dict lookup (a few hundred ns); a miss scores the
prepared member set (tens of µs at 64 workers) and stores the result.

Concurrency: readers take no lock. The member set and its memo live together in one
immutable ``_State`` that writers replace wholesale (under a lock, writers are rare), so a
miss computed against an old member set can only ever land in that old, discarded memo: a
stale shard never outlives ``set_members``.

Memory: one entry per tenant, holding the shard for the last k asked for that tenant (a
route has one shard size at a time; asking the same tenant for another k recomputes and
replaces). When the memo reaches ``max_entries`` it is cleared outright (no LRU
bookkeeping on the hit path); at ~1M tenants x small shards that is some 200 MB worst case.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from sharding.hashing import tenant_hash
from sharding.member import Member, PreparedMembers, prepare
from sharding.rendezvous import ordered_shard

DEFAULT_MAX_ENTRIES = 1_000_000


@dataclass(frozen=True, slots=True)
class _State:
    members: tuple[Member, ...]
    prepared: PreparedMembers
    memo: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)


class ShardCache:
    """Cached ``shard_for(tenant, members, k)`` for one live member set."""

    def __init__(self, members: Sequence[Member] = (), *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._write_lock = threading.Lock()
        self._state = _State(tuple(members), prepare(members))

    @property
    def members(self) -> tuple[Member, ...]:
        """The member set shards are currently computed from."""
        return self._state.members

    def __len__(self) -> int:
        """Number of tenants currently memoised."""
        return len(self._state.memo)

    def set_members(self, members: Sequence[Member]) -> None:
        """Replace the member set (worker joined, left or began draining); forgets every shard."""
        state = _State(tuple(members), prepare(members))  # validate before touching anything
        with self._write_lock:
            self._state = state

    def get(self, tenant: str, k: int) -> tuple[str, ...]:
        """``shard_for(tenant, self.members, k)``, memoised per tenant."""
        state = self._state  # one read: memo and member set always belong together
        hit = state.memo.get(tenant)
        if hit is not None and hit[0] == k:
            return hit[1]
        shard = ordered_shard(tenant_hash(tenant), state.prepared, k)
        memo = state.memo
        if len(memo) >= self._max_entries:
            memo.clear()
        memo[tenant] = (k, shard)
        return shard

    def invalidate(self, tenant: str | None = None) -> None:
        """Forget one tenant's shard, or every shard when ``tenant`` is None."""
        with self._write_lock:
            if tenant is None:
                old = self._state
                self._state = _State(old.members, old.prepared)
            else:
                self._state.memo.pop(tenant, None)
