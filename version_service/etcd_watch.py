"""One etcd watch over a few key prefixes, kept alive in a background thread.

What the router's routing cache (version_service.routing_cache) and the worker's retirement
watch (worker.retirements) share. A subclass says what to watch (`watched_prefixes`), how to read
its state when it cannot resume (`resync`: at start, and after a compaction) and what to do with
the events (`apply`); this class owns the rest:
- the channel: TLS, etcd auth (a token per channel, renewed when etcd says it expired), and
  several endpoints, tried in turn;
- the first sync: the watch thread retries it (next endpoint, back-off) until etcd answers, and
  `start` / `wait_synced` give it a deadline, Unavailable naming the endpoints after it (one way
  for the router's cache and the worker's watch alike);
- resuming: when the watch breaks (etcd restart, network) it reconnects after a back-off
  (BACKOFF_MIN_S doubling to BACKOFF_MAX_S) and resumes from the revision after the last one
  applied, so no event is lost; when etcd has compacted that revision away it resyncs;
- logging the transitions once each (`<name>.disconnected`, `.reconnected`, `.compacted`), never
  once per retry: etcd down for an hour is one warning, not thousands.

Invariant: `revision` is the etcd revision of the newest change applied (or read by `resync`);
every change up to it has been applied.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator, Sequence

import grpc
from pyetcd import etcdrpc

from modelfleet.config import etcd_endpoints
from modelfleet.errors import Unavailable
from modelfleet.log import event
from modelfleet.rpc import RECONNECT_OPTIONS

log = logging.getLogger("modelfleet.etcd_watch")

_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.max_receive_message_length", 256 << 20), *RECONNECT_OPTIONS]

RANGE_PAGE = 5_000  # keys per ranged read at (re)sync, all pages at the first page's revision
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0


def range_end(prefix: str) -> bytes:
    """etcd's range_end for every key under `prefix`."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


class _Compacted(Exception):
    """etcd no longer has the revision the watch wanted to resume from."""


class _WatchBroken(Exception):
    """The watch stream ended or was canceled; reconnect and resume."""


class PrefixWatch:
    """Subclasses set `name` (the log events' prefix) and implement the three hooks."""

    name = "etcd_watch"

    def __init__(self, etcd: str, timeout: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 user: str | None = None, password: str | None = None) -> None:
        self.timeout = timeout
        self.revision = 0
        self.connected = False
        self.resyncs = 0
        self._credentials = credentials
        self._user, self._password = user, password
        self._metadata: tuple = ()
        self._endpoints = [f"{h}:{p}" for h, p in etcd_endpoints(etcd)]
        self._endpoint_index = 0
        self._channel: grpc.Channel | None = None
        self._down_reported = False
        self._last_error = ""  # why the last try failed, for `wait_synced`'s message
        self._answered_at: float | None = None  # monotonic time of etcd's last answer to a sync's read
        self._needs_sync = True  # before the first watch, and after a compaction
        self._synced = threading.Event()  # the first sync is done
        self._stop = threading.Event()
        self._call = None
        self._thread: threading.Thread | None = None

    # -- hooks -----------------------------------------------------------------------------
    def watched_prefixes(self) -> Sequence[str]:
        raise NotImplementedError

    def resync(self) -> None:
        """(Re)reads the state, setting `revision` to the revision read at (`ranged` helps)."""
        raise NotImplementedError

    def apply(self, events) -> None:
        """One watch response's events, in revision order (`revision` follows them afterwards)."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------
    def sync(self) -> None:
        """`resync` once, now, in the caller's thread (grpc.RpcError when etcd does not answer)."""
        self.resync()
        self.resyncs += 1
        self.connected = True
        self._down_reported = False
        self._needs_sync = False
        self._synced.set()

    def start(self, timeout: float = 10.0) -> None:
        """Follows changes (`watch`) and returns once the first sync is done; Unavailable, the watch
        stopped, when etcd does not answer within `timeout` seconds (nothing is left running)."""
        self.watch()
        try:
            self.wait_synced(timeout)
        except BaseException:
            self.stop()
            raise

    def watch(self) -> None:
        """Follows changes in a background thread: from `revision` on, after a `sync` first
        unless one was done (the thread retries it, on the next endpoint, until etcd answers).
        Returns at once: `wait_synced` waits for the first sync (`start` does both)."""
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-watch", daemon=True)
        self._thread.start()

    def wait_synced(self, timeout: float) -> None:
        """Returns once the first sync is done; Unavailable, naming the endpoints and etcd's last
        answer, once `timeout` seconds pass with no answer from etcd (the watch goes on trying). A
        first read that etcd keeps answering, page after page, is waited for however long it takes:
        a big fleet's routes, or a busy etcd, is not an etcd that is down."""
        deadline = time.monotonic() + timeout
        while not self._synced.wait(max(0.0, deadline - time.monotonic())):
            answered = self._answered_at
            if answered is None or answered + timeout <= time.monotonic():
                why = self._last_error or f"no answer within {timeout:g} s"
                raise Unavailable(f"etcd at {','.join(self._endpoints)} unavailable: {why} "
                                  f"({self.name} starting, waited {timeout:g} s)")
            deadline = answered + timeout

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._channel is not None:
            self._channel.close()

    # -- reads for resync ------------------------------------------------------------------
    def ranged(self, prefix: str, revision: int = 0, keys_only: bool = False,
               min_mod_revision: int = 0) -> Iterator[tuple[Sequence, int]]:
        """Every key under `prefix` at `revision` (0: now), in pages of RANGE_PAGE:
        (the page's key-values, the revision read at). One response for 100k routes held ~30 MB
        at once, kept as RSS; pages do not. `min_mod_revision` (0: all): only the keys written at
        or after it, filtered by etcd (what changed since a revision, without the rest)."""
        kv = etcdrpc.KVStub(self._chan())
        start, end = prefix.encode(), range_end(prefix)
        while True:
            resp = kv.Range(etcdrpc.RangeRequest(key=start, range_end=end, revision=revision, limit=RANGE_PAGE,
                                                 keys_only=keys_only, min_mod_revision=min_mod_revision),
                            timeout=self.timeout, metadata=self._metadata)
            self._answered_at = time.monotonic()  # progress, for `wait_synced`
            revision = revision or resp.header.revision  # later pages at the first page's revision
            yield resp.kvs, revision
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    def current_revision(self) -> int:
        """etcd's revision now (one small read: a count of the first watched prefix)."""
        prefix = self.watched_prefixes()[0]
        resp = etcdrpc.KVStub(self._chan()).Range(
            etcdrpc.RangeRequest(key=prefix.encode(), range_end=range_end(prefix), count_only=True),
            timeout=self.timeout, metadata=self._metadata)
        return resp.header.revision

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

    def _requests(self, start_revision: int, outbox: "queue.Queue[object]") -> Iterator[etcdrpc.WatchRequest]:
        for prefix in self.watched_prefixes():
            yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=prefix.encode(), range_end=range_end(prefix), start_revision=start_revision))
        while outbox.get() is not None:  # blocks until the stream ends
            pass

    def _watch_once(self) -> None:
        outbox: "queue.Queue[object]" = queue.Queue()
        watch = etcdrpc.WatchStub(self._chan())
        self._call = watch.Watch(self._requests(self.revision + 1, outbox), metadata=self._metadata)
        if self._stop.is_set():  # `stop` came before there was a call to cancel
            self._call.cancel()
        try:
            for resp in self._call:
                if resp.compact_revision:
                    raise _Compacted(resp.compact_revision)
                if resp.canceled:
                    raise _WatchBroken(f"watch canceled: {resp.cancel_reason}")
                if resp.created and not self.connected:
                    self.connected = True
                    self._down_reported = False
                    event(log, f"{self.name}.reconnected", revision=self.revision)
                if resp.events:
                    self.apply(resp.events)
                    self.revision = max(self.revision, resp.events[-1].kv.mod_revision)
        finally:
            outbox.put(None)
            self._call.cancel()

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            try:
                if self._needs_sync:
                    self.sync()
                self._watch_once()
                backoff = BACKOFF_MIN_S
            except _Compacted as exc:
                event(log, f"{self.name}.compacted", level=logging.WARNING, revision=self.revision,
                      compact_revision=exc.args[0])
                self._needs_sync = True  # events were lost: read everything again, then watch
            except (grpc.RpcError, _WatchBroken) as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._metadata = ()  # an expired token: authenticate again
                code = exc.code().name if isinstance(exc, grpc.Call) else str(exc)
                self._last_error = code
                if not self._down_reported:
                    event(log, f"{self.name}.disconnected", level=logging.WARNING, revision=self.revision,
                          error=code, retrying_every_s=BACKOFF_MAX_S)
                    self._down_reported = True
                self.connected = False
                self._next_endpoint()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
