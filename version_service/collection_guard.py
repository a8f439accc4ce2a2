"""The guard between garbage collection and registration over shared artifacts.

Artifacts are content-addressed and shared: `gc` deletes one when no version record uses it,
while `register` and `import` skip storing a file whose artifact exists and write their version
record later. Without a guard a collection could delete an artifact between a registration's
"it exists" and its record, leaving a serving version with no artifact. So:

- the collector writes the guard `deleting` under a lease (it goes by itself if the collector
  dies), re-reads every version record, deletes what none uses, then writes it quiet;
- a registration waits while the guard says `deleting`, then makes sure its artifacts are in
  the store, and its etcd write compares the guard unchanged since it looked.

Either the registration's record is written before the collector's guard (the collector's
re-read sees it and keeps the artifact), or the registration looked after the collection was
over (and stored its artifact again if it had gone).
"""
from __future__ import annotations

import getpass
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

from modelfleet.errors import Unavailable
from version_service.artifact_intake import TakenIn
from version_service.etcd_client import EtcdClient, etcd_errors
from version_service.schema import CollectionRecord, Keys, utc_stamp

GUARD_TTL_S = 15  # the lease of a `deleting` guard; kept alive while the collector runs
WAIT_S = 120.0  # how long a registration waits for a collection to finish deleting


def quiet_revision(client: EtcdClient, keys: Keys, wait_s: float = WAIT_S) -> int:
    """The guard's mod revision (0: never written) once no collection is deleting; waits for one
    that is (Unavailable after `wait_s`). Compare it unchanged in the write that follows."""
    deadline = time.monotonic() + wait_s
    while True:
        with etcd_errors(client, "reading the garbage collector's guard"):
            raw, meta = client.get(keys.gc_guard)
        if raw is None or not CollectionRecord.from_json(raw).deleting:
            return meta.mod_revision if raw is not None else 0
        if time.monotonic() >= deadline:
            raise Unavailable(f"a garbage collection has been deleting artifacts for over {wait_s:.0f} s; retry")
        time.sleep(0.2)


def restored_after_collection(client: EtcdClient, keys: Keys, store, guard: int,
                               taken: Iterable[TakenIn]) -> int:
    """After a write that compared `guard` and failed: the guard's revision now. If a collection
    ran since `guard`, each model it may have deleted is stored again first, and only if its file
    still holds the bytes that were checked (else Conflict)."""
    now = quiet_revision(client, keys)
    if now != guard:
        for model in taken:
            model.restore(store)
    return now


@contextmanager
def collecting(client: EtcdClient, keys: Keys, actor: str | None = None) -> Iterator[None]:
    """Holds the guard at `deleting` (leased, kept alive) for the body; quiet again after it."""
    actor = actor or getpass.getuser()
    with etcd_errors(client, "writing the garbage collector's guard"):
        lease = client.lease(GUARD_TTL_S)
        client.put(keys.gc_guard, CollectionRecord(deleting=True, at=utc_stamp(), actor=actor).to_json(),
                   lease=lease.id)
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(GUARD_TTL_S / 3):
            try:
                for _ in client.refresh_lease(lease.id):
                    break
            except Exception:  # noqa: BLE001 - etcd away: the lease lapses and registrations stop waiting
                pass

    keeper = threading.Thread(target=keep_alive, name="gc-guard", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=5)
        with etcd_errors(client, "writing the garbage collector's guard"):
            client.put(keys.gc_guard, CollectionRecord(deleting=False, at=utc_stamp(), actor=actor).to_json())
            client.revoke_lease(lease.id)  # the quiet guard has no lease: revoking leaves it
