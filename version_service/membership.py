"""Membership: a worker's (or router's) record lives under an etcd lease it keeps alive.

A worker that dies stops refreshing; etcd deletes its key when the lease's TTL runs out and
every router's watch drops it from the shards. A process that was merely cut off (SIGSTOP, a
network blip) and finds its lease gone on return grants a new one and registers again.
"""
from __future__ import annotations

import logging
import threading

from modelfleet.log import event
from version_service.etcd_client import EtcdClient, etcd_errors
from version_service.schema import DrainRecord, Keys, RouterRecord, WorkerRecord

log = logging.getLogger("modelfleet.membership")


class LeasedRegistration:
    """Keeps `record` at `key` for as long as this process lives (and a little longer: the TTL)."""

    def __init__(self, client: EtcdClient, key: str, record, ttl: int = 10) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 seconds")
        self.client = client
        self.key = key
        self.name = key.rstrip("/").rsplit("/", 1)[-1]
        self.record = record
        self.ttl = ttl
        self.lease_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Registers now (raising Unavailable if etcd is down), then keeps the lease alive."""
        self._register()
        self._thread = threading.Thread(target=self._keep_alive, name="membership", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        with etcd_errors(self.client, f"registering {self.name}"):
            lease = self.client.lease(self.ttl)
            self.client.put(self.key, self.record.to_json(), lease=lease.id)
        self.lease_id = lease.id
        event(log, "membership.registered", name=self.name, address=self.record.address, lease=lease.id,
              ttl=self.ttl)

    def update(self, record) -> None:
        """Rewrites the record under the same lease (e.g. a worker going from joining to live)."""
        self.record = record
        with etcd_errors(self.client, f"updating {self.name}"):
            self.client.put(self.key, record.to_json(), lease=self.lease_id)
        event(log, "membership.updated", name=self.name)

    def _refresh(self) -> bool:
        """True while the lease is alive; False when etcd says it expired."""
        with etcd_errors(self.client, "refreshing the worker lease"):
            for response in self.client.refresh_lease(self.lease_id):
                return response.TTL > 0
        return False

    def _keep_alive(self) -> None:
        interval = max(0.5, self.ttl / 3)
        while not self._stop.wait(interval):
            try:
                if not self._refresh():
                    event(log, "membership.lease_lost", level=logging.WARNING, name=self.name)
                    self._register()
            except Exception as exc:  # noqa: BLE001 - keep trying while etcd is away
                event(log, "membership.refresh_failed", level=logging.WARNING, name=self.name,
                      error=str(exc))

    def stop(self) -> None:
        """Leaves the fleet now: revoking the lease deletes the key, routers drop us at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lease_id is not None:
            try:
                with etcd_errors(self.client, "revoking the worker lease"):
                    self.client.revoke_lease(self.lease_id)
                event(log, "membership.left", name=self.name)
            except Exception as exc:  # noqa: BLE001 - the lease will expire by itself
                event(log, "membership.leave_failed", level=logging.WARNING, error=str(exc))


def list_workers(client: EtcdClient, keys: Keys) -> list[WorkerRecord]:
    """Every registered worker (drained and joining ones included), sorted by id."""
    with etcd_errors(client, "listing workers"):
        resp = client.get_prefix_response(keys.workers)
    return sorted((WorkerRecord.from_json(kv.value) for kv in resp.kvs), key=lambda w: w.worker_id)


def read_fleet(client: EtcdClient, keys: Keys) -> tuple[dict[str, WorkerRecord], dict[str, DrainRecord]]:
    """Workers and drains at one etcd revision (what a router's cache holds)."""
    with etcd_errors(client, "reading the fleet"):
        workers_resp = client.get_prefix_response(keys.workers)
        drains_resp = client.get_prefix_response(keys.drains, revision=workers_resp.header.revision)
    workers = {keys.worker_of_key(kv.key.decode()): WorkerRecord.from_json(kv.value) for kv in workers_resp.kvs}
    drains = {keys.worker_of_drain(kv.key.decode()): DrainRecord.from_json(kv.value) for kv in drains_resp.kvs}
    return workers, drains


def list_routers(client: EtcdClient, keys: Keys) -> list[RouterRecord]:
    """Every live router (they register under a lease, like workers), sorted by id."""
    with etcd_errors(client, "listing routers"):
        resp = client.get_prefix_response(keys.routers)
    return sorted((RouterRecord.from_json(kv.value) for kv in resp.kvs), key=lambda r: r.router_id)


def published_shard_sizes(client: EtcdClient, keys: Keys) -> dict[str, int]:
    """router_id -> the --shard-size it routes with, for the live routers that publish one: what
    plans and warm-ups must use, or they move other members than the routers do."""
    return {r.router_id: r.shard_size for r in list_routers(client, keys) if r.shard_size}
