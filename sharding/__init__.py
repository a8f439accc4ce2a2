"""Shuffle sharding: which k workers serve a tenant. Pure functions, no I/O.

Public API:

* ``Member`` - a live worker (id, zone).
* ``shard_for(tenant, members, k)`` - one tenant's ordered shard of worker ids.
* ``ShardCache`` - ``shard_for`` memoised per tenant for the router's hot path.
* ``fleet_shards(tenants, members, k)`` - all tenants at once (numpy), for plans and reports.
* ``tenant_hash`` / ``worker_hash`` - the 64-bit hashes the scores are built from.

Modules: ``hashing`` (hashes and the score finaliser), ``member`` (member sets), ``rendezvous``
(one tenant's ordering, and the invariants), ``cache`` (``ShardCache``), ``fleet`` (vectorised).
"""
from sharding.cache import ShardCache
from sharding.fleet import fleet_shards
from sharding.hashing import tenant_hash, worker_hash
from sharding.member import MAX_SHARD_SIZE, Member
from sharding.rendezvous import shard_for

__all__ = ["MAX_SHARD_SIZE", "Member", "ShardCache", "fleet_shards", "shard_for", "tenant_hash", "worker_hash"]
