"""Worker membership: a worker's record lives under an etcd lease it keeps alive.

A worker that dies stops refreshing; etcd deletes its key when the lease's TTL runs out and
every router's watch drops it from the shards. A worker that was merely cut off (SIGSTOP, a
network blip) and finds its lease gone on return grants a new one and registers again.
"""
from __future__ import annotations

import logging
import threading

from modelfleet.log import event
from version_service.etcd_client import EtcdClient, etcd_errors
from version_service.schema import Keys, WorkerRecord

log = logging.getLogger("modelfleet.membership")


class WorkerMembership:
    def __init__(self, client: EtcdClient, keys: Keys, record: WorkerRecord, ttl: int = 10) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 seconds")
        self.client = client
        self.keys = keys
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
        with etcd_errors(self.client, f"registering worker {self.record.worker_id}"):
            lease = self.client.lease(self.ttl)
            self.client.put(self.keys.worker(self.record.worker_id), self.record.to_json(), lease=lease.id)
        self.lease_id = lease.id
        event(log, "membership.registered", worker=self.record.worker_id, address=self.record.address,
              zone=self.record.zone, lease=lease.id, ttl=self.ttl)

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
                    event(log, "membership.lease_lost", level=logging.WARNING, worker=self.record.worker_id)
                    self._register()
            except Exception as exc:  # noqa: BLE001 - keep trying while etcd is away
                event(log, "membership.refresh_failed", level=logging.WARNING, worker=self.record.worker_id,
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
                event(log, "membership.left", worker=self.record.worker_id)
            except Exception as exc:  # noqa: BLE001 - the lease will expire by itself
                event(log, "membership.leave_failed", level=logging.WARNING, error=str(exc))


def list_workers(client: EtcdClient, keys: Keys) -> list[WorkerRecord]:
    """Every registered worker (draining ones included), sorted by id."""
    with etcd_errors(client, "listing workers"):
        resp = client.get_prefix_response(keys.workers)
    return sorted((WorkerRecord.from_json(kv.value) for kv in resp.kvs), key=lambda w: w.worker_id)
