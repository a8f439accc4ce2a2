"""The router's in-memory copy of routes/, workers/, drains/ and apikeys/, fed by one etcd watch.

Every Predict reads this cache; none talks to etcd. It starts with one ranged read per prefix
(both at the same revision), then watches from the next revision. When the watch breaks (etcd
restart, network) it reconnects and resumes from the last revision it applied, so no event is
lost; when etcd has compacted that revision away it re-reads everything. While etcd is away the
cache keeps serving what it has.

Invariant: `revision` is the etcd revision of the newest change applied; every change up to it
is in the maps.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterator

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from modelfleet.config import etcd_endpoints
from modelfleet.errors import Unavailable
from modelfleet.log import event
from modelfleet.rpc import RECONNECT_OPTIONS
from version_service.schema import ApiKeyRecord, DrainRecord, Keys, RouteRecord, WorkerRecord, live_members

log = logging.getLogger("modelfleet.routing_cache")

ChangeListener = Callable[[str], None]  # called with "routes" or "workers" from the watch thread

_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.max_receive_message_length", 256 << 20), *RECONNECT_OPTIONS]


RANGE_PAGE = 5_000  # records per ranged read at (re)sync, all pages at the first page's revision


def _range_end(prefix: str) -> bytes:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


class _Compacted(Exception):
    """etcd no longer has the revision the watch wanted to resume from."""


class _WatchBroken(Exception):
    """The watch stream ended or was canceled; reconnect and resume."""


class RoutingCache:
    def __init__(self, etcd: str, keys: Keys, timeout: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 user: str | None = None, password: str | None = None) -> None:
        self.keys = keys
        self.timeout = timeout
        self._credentials = credentials
        self._user, self._password = user, password
        self._metadata: tuple = ()
        self.routes: dict[str, RouteRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.drains: dict[str, DrainRecord] = {}
        self.api_keys: dict[str, ApiKeyRecord] = {}
        self.revision = 0
        self.connected = False
        self.resyncs = 0
        self.last_change = time.monotonic()
        self._endpoints = [f"{h}:{p}" for h, p in etcd_endpoints(etcd)]
        self._endpoint_index = 0
        self._channel: grpc.Channel | None = None
        self._listeners: list[ChangeListener] = []
        self._stop = threading.Event()
        self._call = None
        self._thread: threading.Thread | None = None

    # -- reads (any thread) ----------------------------------------------------------------
    def route(self, tenant: str) -> RouteRecord | None:
        return self.routes.get(tenant)

    def live_members(self):
        """Shard members now: registered, not joining, not drained."""
        return live_members(self.workers, self.drains)

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Loads everything (Unavailable if etcd does not answer within timeout), then watches."""
        self.load(timeout)
        self.watch()

    def load(self, timeout: float = 10.0) -> None:
        """The initial ranged read of routes/ and workers/ at one revision."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._resync()
                break
            except grpc.RpcError as exc:
                self._next_endpoint()
                if time.monotonic() >= deadline:
                    raise Unavailable(f"etcd at {','.join(self._endpoints)} unavailable: {exc.code().name}") from None
                time.sleep(0.2)

    def watch(self) -> None:
        """Follows changes from the loaded revision on, in a background thread."""
        self._thread = threading.Thread(target=self._run, name="routing-cache-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._channel is not None:
            self._channel.close()

    # -- internals -------------------------------------------------------------------------
    def _chan(self) -> grpc.Channel:
        if self._channel is None:
            target = self._endpoints[self._endpoint_index]
            self._channel = (grpc.secure_channel(target, self._credentials, options=_CHANNEL_OPTIONS)
                             if self._credentials is not None
                             else grpc.insecure_channel(target, options=_CHANNEL_OPTIONS))
            self._metadata = ()
        if self._user and not self._metadata:  # etcd auth: a token for every call on this channel
            reply = etcdrpc.AuthStub(self._channel).Authenticate(
                etcdrpc.AuthenticateRequest(name=self._user, password=self._password or ""), timeout=self.timeout)
            self._metadata = (("token", reply.token),)
        return self._channel

    def _next_endpoint(self) -> None:
        if len(self._endpoints) > 1 and self._channel is not None:
            self._channel.close()
            self._channel = None
            self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)

    def _prefixes(self):
        """(prefix, record class, key parser, map attribute) for every watched prefix."""
        return ((self.keys.routes, RouteRecord, self.keys.tenant_of_route, "routes"),
                (self.keys.workers, WorkerRecord, self.keys.worker_of_key, "workers"),
                (self.keys.drains, DrainRecord, self.keys.worker_of_drain, "drains"),
                (self.keys.api_keys, ApiKeyRecord, self.keys.key_of_api_key, "api_keys"))

    def _resync(self) -> None:
        kv = etcdrpc.KVStub(self._chan())
        metadata = self._metadata
        revision = 0
        maps: dict[str, dict] = {}
        for prefix, cls, parse_key, attr in self._prefixes():
            records = {}
            start, end = prefix.encode(), _range_end(prefix)
            while True:  # in pages: one response for 100k routes held ~30 MB at once, kept as RSS
                resp = kv.Range(etcdrpc.RangeRequest(key=start, range_end=end, revision=revision, limit=RANGE_PAGE),
                                timeout=self.timeout, metadata=metadata)
                revision = revision or resp.header.revision  # later reads at the first read's revision
                for item in resp.kvs:
                    record = self._decode(cls, item)
                    if record is not None:
                        records[parse_key(item.key.decode())] = record
                if not resp.more or not resp.kvs:
                    break
                start = resp.kvs[-1].key + b"\0"
                del resp
            maps[attr] = records
        for attr, records in maps.items():
            setattr(self, attr, records)
        self.revision = revision
        self.resyncs += 1
        self.connected = True
        self.last_change = time.monotonic()
        event(log, "routing_cache.synced", revision=revision, tenants=len(self.routes), workers=len(self.workers),
              drains=len(self.drains))
        self._notify("routes")
        self._notify("workers")

    @staticmethod
    def _decode(cls, item):
        try:
            return cls.from_json(item.value)
        except (ValueError, TypeError) as exc:
            event(log, "routing_cache.bad_record", level=logging.WARNING, key=item.key.decode(errors="replace"),
                  error=str(exc))
            return None

    def _notify(self, kind: str) -> None:
        for listener in self._listeners:
            try:
                listener(kind)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the watch
                log.exception("routing_cache.listener_failed")

    def _requests(self, start_revision: int, outbox: "queue.Queue[object]") -> Iterator[etcdrpc.WatchRequest]:
        for prefix, *_ in self._prefixes():
            yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=prefix.encode(), range_end=_range_end(prefix), start_revision=start_revision))
        while outbox.get() is not None:  # blocks until the stream ends
            pass

    def _watch_once(self) -> None:
        outbox: "queue.Queue[object]" = queue.Queue()
        watch = etcdrpc.WatchStub(self._chan())
        self._call = watch.Watch(self._requests(self.revision + 1, outbox), metadata=self._metadata)
        try:
            for resp in self._call:
                if resp.compact_revision:
                    raise _Compacted(resp.compact_revision)
                if resp.canceled:
                    raise _WatchBroken(f"watch canceled: {resp.cancel_reason}")
                if resp.created and not self.connected:
                    self.connected = True
                    event(log, "routing_cache.reconnected", revision=self.revision)
                self._apply(resp.events)
        finally:
            outbox.put(None)
            self._call.cancel()

    def _apply(self, events) -> None:
        changed: set[str] = set()
        for ev in events:
            key = ev.kv.key.decode()
            for prefix, cls, parse_key, attr in self._prefixes():
                if key.startswith(prefix):
                    records = getattr(self, attr)
                    name = parse_key(key)
                    if ev.type == kv_pb2.Event.DELETE:
                        records.pop(name, None)
                    else:
                        record = self._decode(cls, ev.kv)
                        if record is not None:
                            records[name] = record
                    changed.add({"routes": "routes", "api_keys": "api_keys"}.get(attr, "workers"))  # drains: membership
                    break
            self.revision = max(self.revision, ev.kv.mod_revision)
        if changed:
            self.last_change = time.monotonic()
        for kind in sorted(changed):
            self._notify(kind)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._watch_once()
                backoff = 0.05
            except _Compacted as exc:
                event(log, "routing_cache.compacted", level=logging.WARNING, revision=self.revision,
                      compact_revision=exc.args[0])
                try:
                    self._resync()
                except grpc.RpcError:
                    pass
            except (grpc.RpcError, _WatchBroken) as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._metadata = ()  # an expired token: authenticate again
                if self.connected:
                    code = exc.code().name if isinstance(exc, grpc.Call) else str(exc)
                    event(log, "routing_cache.disconnected", level=logging.WARNING, revision=self.revision, error=code)
                self.connected = False
                self._next_endpoint()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
