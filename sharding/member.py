"""Workers as the sharding functions see them, and their once-per-member-set preparation.

Everything that depends only on the member set (hashes, the id order used to break ties,
zone codes) is computed here once, so per-tenant work is just scoring and ordering.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


from sharding.hashing import worker_hash

# The most workers one tenant's shard may name: set-shard-size, shard plans and routes all stop here.
MAX_SHARD_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Member:
    """One live worker that may be placed in shards.

    Draining or dead workers are not Members: the caller filters them out before sharding,
    so "who is eligible" is decided in exactly one place (membership), not here.
    """

    worker_id: str
    zone: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not self.worker_id:
            raise ValueError(f"Member.worker_id must be a non-empty string, got {self.worker_id!r}")
        if not isinstance(self.zone, str) or not self.zone:
            raise ValueError(f"Member.zone must be a non-empty string, got {self.zone!r}")


@dataclass(frozen=True, slots=True)
class PreparedMembers:
    """A member set in canonical form. Private to the package.

    Invariant: members are held in ascending ``worker_id`` order ("id order"), whatever order
    the caller passed them in. Every ranking sorts by score with a *stable* sort over this
    order, so equal scores are broken by worker id ascending and the result is independent of
    the caller's ordering.
    """

    ids: tuple[str, ...]          # worker ids, ascending
    hashes: tuple[int, ...]       # worker_hash(ids[i])
    zone_codes: tuple[int, ...]   # index into zone_names for ids[i]
    zone_names: tuple[str, ...]   # distinct zones, ascending
    index: tuple[int, ...]        # position of ids[i] in the caller's sequence
    has_hash_ties: bool           # two workers share a worker_hash (=> equal scores; see hashing)

    @property
    def n(self) -> int:
        return len(self.ids)


def prepare(members: Sequence[Member]) -> PreparedMembers:
    """Validate a member set and put it in canonical (id) order.

    Raises TypeError for a non-Member entry and ValueError for a repeated worker id: the
    same worker twice (perhaps in two zones) has no well-defined place in a shard.
    """
    for i, m in enumerate(members):
        if not isinstance(m, Member):
            raise TypeError(f"members[{i}] is {type(m).__name__}, expected sharding.Member")
    order = sorted(range(len(members)), key=lambda i: members[i].worker_id)
    ids = tuple(members[i].worker_id for i in order)
    for a, b in zip(ids, ids[1:]):
        if a == b:
            raise ValueError(f"duplicate worker_id {a!r} in members")
    zones = [members[i].zone for i in order]
    zone_names = tuple(sorted(set(zones)))
    code = {z: c for c, z in enumerate(zone_names)}
    hashes = tuple(worker_hash(w) for w in ids)
    return PreparedMembers(
        ids=ids,
        hashes=hashes,
        zone_codes=tuple(code[z] for z in zones),
        zone_names=zone_names,
        index=tuple(order),
        has_hash_ties=len(set(hashes)) != len(hashes),
    )
