"""The worker's model cache: bounded by bytes, W-TinyLFU eviction, one load per model at a time.

Invariants:
- the sum of `nbytes` of cached models never exceeds the budget. Which models stay is
  worker.tinylfu_cache's job: an LRU whose main area admits a model only if it is asked for
  more often than the model it would push out, so a tail of one-off tenants does not flush the
  hot ones (each flushed model costs a parse when it comes back). A model larger than the whole
  budget is freed and its requests get RESOURCE_EXHAUSTED: a sizing error the operator must
  see, not a reload on every request;
- concurrent requests for a model that is not loaded share one load (single flight): the
  first starts it in the load pool, the others await the same task, and a caller that gives
  up (deadline) does not cancel the load for the rest;
- an evicted model's native memory is freed exactly once, after the last request using it
  has finished (LoadedModel.borrow / close), on a thread of its own, not the event loop's;
- a miss is never handed a closed model: other loads may finish between a model's load and
  its waiters' turn on the loop and evict it (a small cache, many loads at once), so a load
  holds its model (LoadedModel.retain) until its last waiter has used it;
- a version gc removed (`retire`, from worker.retirements) leaves the cache as an eviction
  does (freed once its last user is done), and a load of it in flight then is not cached: its
  waiters get NOT_FOUND, and later requests load it anew, which is NOT_FOUND too;
- a failed load is remembered for a back-off (worker.negative_cache): requests within it get
  the same error without a load;
- a model whose artifact is on this machine (a local store, a remote store's disk cache) never
  waits behind the network: loads run on `load_threads` threads (which bound the parses, and so
  LightGBM's memory, at once), and a loader that finds its artifact remote returns a `Fetch`,
  whose download runs on `fetch_threads` threads of their own. A hung store holds fetch threads
  only; the load threads stay free for local loads. Loads of one artifact at once share one fetch
  (the others wait for its bytes, on no thread), and at most `fetch_threads` fetches hold their
  bytes at once (a download, then its parse on a load thread);
- at most `max_queued_loads` requests wait for loads at once; a miss beyond that gets
  RESOURCE_EXHAUSTED with a retry hint at once (bounded memory and latency under a cold-load
  storm). Hits never wait and are never shed: a warm tenant's request does not queue behind
  anyone's load (loads run in their own pool; hits return before any await).

Artifact hints (worker.artifact_hint): a request may name the artifact digest of the model it
wants, as a router does from the tenant's route. A miss with a hint loads that artifact without
reading the version record from etcd. What a hint can never do is change what anyone else is
served: a cached model is served to a request with a hint only if it was parsed from exactly
that digest, and to a request without one only once its digest has been checked against the
version record. Anything else (a model loaded from another caller's hint, a hint that disagrees
with the cached model) is settled against the record first: the cached model is kept if the
record names it, else evicted (`artifact_mismatches`) and the record's artifact loaded. Loads
and remembered failures are per (tenant, version, hint), so a bad hint's failure is not served
to callers with a good one.

With tracing on (modelfleet.tracing) a load is a `load` span, the child of the request that
started it (the single flight's first caller), current in the load thread for the loader.

Everything except the load itself runs on the event loop thread, so the maps need no locks.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from cachetools import LRUCache

from modelfleet import tracing
from modelfleet.config import FETCH_THREADS, MAX_QUEUED_LOADS
from modelfleet.errors import NotFound, ResourceExhausted
from modelfleet.log import event
from worker.negative_cache import NegativeCache
from worker.overload import RetryLater
from worker.predictor import LoadedModel
from worker.tinylfu_cache import TinyLfuCache

log = logging.getLogger("modelfleet.model_cache")

ModelKey = tuple[str, str]  # (tenant, version)


@dataclass(frozen=True)
class Fetch:
    """A load whose artifact is not on this machine: `fetch()` downloads its verified bytes (on a
    fetch thread: it may wait on the network for seconds), then `make(data)` the model (on a load
    thread). What a loader returns instead of a model, so that a hung store never holds a load
    thread. `artifact`: the digest `fetch` verifies its bytes against; loads of one artifact at
    once share one fetch (ModelCache._fetched)."""
    fetch: Callable[[], bytes]
    make: Callable[[bytes], LoadedModel]
    artifact: str


# (tenant, version) -> model, and (tenant, version, artifact digest) -> model for a hinted load;
# or a Fetch when the artifact must be downloaded first.
Loader = Callable[..., LoadedModel | Fetch]
# (tenant, version, fresh) -> the digest the version record names (fresh: re-read from etcd).
RecordDigest = Callable[[str, str, bool], str]


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    shed: int = 0  # misses answered RESOURCE_EXHAUSTED because too many requests waited for loads
    artifact_mismatches: int = 0  # cached models evicted because their version record names another artifact
    admission_rejections: int = 0  # loaded models that left the window wanted less than what they would displace
    retirements: int = 0  # cached models evicted because gc removed their version


_LOAD_MS_GUESS = 50.0  # the retry hint's load time before any load has been measured


LOAD_COUNTS_KEPT = 20_000


def _retrieved(future: asyncio.Future) -> None:
    """Marks a shared fetch's failure as seen: when no other load waited for it, asyncio would
    otherwise log "exception was never retrieved" (the load that fetched raised its own error already)."""
    if not future.cancelled():
        future.exception()


class ModelCache:
    def __init__(self, loader: Loader, budget_bytes: int, load_threads: int = 4,
                 max_queued_loads: int | None = None, failures: NegativeCache | None = None,
                 record_digest: RecordDigest | None = None,
                 fetch_threads: int = FETCH_THREADS.default) -> None:
        """max_queued_loads None: MODELFLEET_MAX_QUEUED_LOADS, else 256; 0 = no bound.
        record_digest None: nothing to check hints against (every model counts as checked).
        fetch_threads: downloads at once (a loader's Fetch), apart from the load threads."""
        if max_queued_loads is None:
            max_queued_loads = MAX_QUEUED_LOADS.resolve_default()
        self.budget = budget_bytes
        self.counters = CacheCounters()
        self.max_queued_loads = max_queued_loads
        self.failures = failures if failures is not None else NegativeCache()
        self.waiting = 0  # requests awaiting a load now (the bounded queue)
        self._load_threads = max(1, load_threads)
        self._load_ms = _LOAD_MS_GUESS  # moving average, for the retry hint
        self._loader = loader
        self._record_digest = record_digest
        self._models: TinyLfuCache[ModelKey, LoadedModel] = TinyLfuCache(
            budget_bytes, sizeof=lambda model: model.nbytes, on_evict=self._evicted)
        self._inflight: dict[ModelKey, asyncio.Task] = {}
        self._waiters: dict[asyncio.Task, int] = {}  # requests awaiting each load
        self._retired_loads: set[asyncio.Task] = set()  # loads in flight when gc removed their version
        self._last_used: dict[ModelKey, float] = {}  # cached models only: who is active (make-before-break)
        # Loads per model (Stats' thrash indicator), for the models loaded most recently: a
        # bounded ~4 MB of bookkeeping beside the budget, not ~200 bytes for every tenant ever seen.
        self._load_counts: LRUCache = LRUCache(maxsize=LOAD_COUNTS_KEPT)
        self._pool = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="model-load")
        # Downloads (a Fetch), apart from the load threads; a slot is held from the download to
        # the end of its parse, so fetched bytes waiting for a load thread stay bounded too.
        self._fetcher = ThreadPoolExecutor(max_workers=max(1, fetch_threads), thread_name_prefix="model-fetch")
        self._fetch_slots = asyncio.Semaphore(max(1, fetch_threads))
        # artifact digest -> the bytes of the fetch of it in flight: tenants often share an artifact
        # (fleets from templates) and their cold loads come together; each waiting on its own
        # fetch thread for one download would take every fetch thread, and stall other artifacts.
        self._fetching: dict[str, asyncio.Future] = {}
        # Evicted models are freed here, off the event loop: LightGBM's free of a large model
        # takes milliseconds (~0.8 ms for 1000 trees x 63 leaves), which every request would wait.
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-free")
        # Seconds of each successful load (queueing excluded), e.g. a Prometheus histogram's observe.
        self.observe_load: Callable[[float], None] | None = None

    @property
    def bytes_used(self) -> int:
        return self._models.currsize

    def __len__(self) -> int:
        return len(self._models)

    def items(self) -> list[tuple[ModelKey, LoadedModel]]:
        return self._models.items()

    def load_count(self, key: ModelKey) -> int:
        return self._load_counts.get(key, 0)

    def peek(self, tenant: str, version: str) -> LoadedModel | None:
        """The cached model without loading, touching recency or counting a request."""
        return self._models.peek((tenant, version))

    async def get(self, tenant: str, version: str, artifact: str | None = None,
                  warm: bool = False) -> tuple[LoadedModel, bool]:
        """(model, loaded_now). `artifact`: the caller's artifact hint, if any (see the module
        docstring). `warm`: a rebalance loads it ahead of its traffic, so a load is admitted to
        the cache's main area whatever the tenant's frequency here so far. Raises the loader's
        error (NotFound, FailedPrecondition, ...)."""
        key = (tenant, version)
        model = self._models.get(key)  # counts the request for the admission filter, hit or miss
        if model is not None:
            servable = model.artifact_sha256 == artifact if artifact is not None else model.record_checked
            if not servable:
                servable = await self._settle(key, model, artifact)
                if not servable:
                    artifact = None  # the cached model was not the registered one: load what the record names
                elif model.closed:  # evicted while the record was read
                    servable = False
            if servable:
                self.counters.hits += 1
                self._last_used[key] = time.monotonic()
                return model, False
        return await self._miss(key, artifact, warm)

    async def _settle(self, key: ModelKey, model: LoadedModel, artifact: str | None) -> bool:
        """Whether the cached `model` is the artifact the version record names (then it counts as
        checked from now on); if not, it is evicted. The record is read again from etcd when the
        cached copy disagrees with the model or the hint."""
        if self._record_digest is None:
            return True
        loop = asyncio.get_running_loop()
        registered = await loop.run_in_executor(self._pool, self._record_digest, *key, False)
        if registered != model.artifact_sha256 or (artifact is not None and artifact != registered):
            registered = await loop.run_in_executor(self._pool, self._record_digest, *key, True)
        if registered == model.artifact_sha256:
            model.record_checked = True
            return True
        if self._models.peek(key) is model:
            self._models.pop(key)
            self._evicted(key, model)
            self.counters.artifact_mismatches += 1
            event(log, "model.artifact_mismatch", level=logging.WARNING, tenant=key[0], version=key[1],
                  cached=model.artifact_sha256, registered=registered, hint=artifact)
        return False

    async def _miss(self, key: ModelKey, artifact: str | None, warm: bool = False) -> tuple[LoadedModel, bool]:
        self.counters.misses += 1
        load_key = key if artifact is None else (*key, artifact)
        self.failures.check(load_key)  # a remembered failure: the same error, no load
        if self.max_queued_loads and self.waiting >= self.max_queued_loads:
            self.counters.shed += 1
            raise RetryLater(f"worker has {self.waiting} requests waiting for model loads, its limit "
                             f"(tenant {key[0]!r} version {key[1]!r} is not loaded)", self._retry_after_ms())
        task = self._inflight.get(load_key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, artifact, load_key, warm))
            self._inflight[load_key] = task
        self._waiters[task] = self._waiters.get(task, 0) + 1
        self.waiting += 1
        try:
            return await asyncio.shield(task), True
        finally:
            self.waiting -= 1
            self._left(task)

    def _left(self, task: asyncio.Task) -> None:
        """A waiter of `task` resumed (or gave up). The last one lets go of the delivery hold
        (see `_load_and_cache`) once its own step on the loop is over: by then it has predicted,
        or borrowed the model for a batch."""
        left = self._waiters.pop(task) - 1
        if left:
            self._waiters[task] = left
        elif task.done() and not task.cancelled() and task.exception() is None:
            asyncio.get_running_loop().call_soon(task.result().release)

    def _retry_after_ms(self) -> int:
        """About when the queue ahead will have drained: waiting loads x load time / threads."""
        return int(min(5000.0, max(10.0, self.waiting * self._load_ms / self._load_threads)))

    @staticmethod
    def _timed(call: Callable, *args) -> tuple[object, float]:
        """In a pool's thread: call's result and the milliseconds it took (queueing excluded)."""
        started = time.perf_counter()
        result = call(*args)
        return result, (time.perf_counter() - started) * 1000

    async def _run_load(self, key: ModelKey, artifact: str | None, traced: bool) -> tuple[LoadedModel, float]:
        """The model and the milliseconds its load took in threads (queueing excluded): the
        loader on a load thread, and if it answers with a Fetch, the download on a fetch thread
        and the parse on a load thread again. `traced`: the load span's context goes along."""
        loop = asyncio.get_running_loop()

        def run(pool: ThreadPoolExecutor, *call):
            if traced:
                return loop.run_in_executor(pool, contextvars.copy_context().run, self._timed, *call)
            return loop.run_in_executor(pool, self._timed, *call)

        loaded, ms = await run(self._pool, self._loader, *key, *([artifact] if artifact is not None else []))
        if not isinstance(loaded, Fetch):
            return loaded, ms
        shared = self._fetching.get(loaded.artifact)
        if shared is not None:  # another load fetches these bytes: wait for them, holding no fetch thread
            try:
                data = await asyncio.shield(shared)
            except Exception:  # noqa: BLE001 - its failure is worded for its own tenant: fetch for this one
                pass
            else:
                model, make_ms = await run(self._pool, loaded.make, data)  # verified against the same digest
                return model, ms + make_ms
        fetched = self._fetching[loaded.artifact] = loop.create_future()
        fetched.add_done_callback(_retrieved)
        try:
            async with self._fetch_slots:
                data, fetch_ms = await run(self._fetcher, loaded.fetch)
                fetched.set_result(data)
                model, make_ms = await run(self._pool, loaded.make, data)
        finally:
            if not fetched.done():  # failed, or cancelled before its bytes came (or while it waited for a slot):
                fetched.set_exception(RuntimeError("fetch failed or abandoned"))  # its waiters fetch for themselves
            if self._fetching.get(loaded.artifact) is fetched:
                del self._fetching[loaded.artifact]
        return model, ms + fetch_ms + make_ms

    async def _load(self, key: ModelKey, artifact: str | None, load_key: tuple, warm: bool) -> LoadedModel:
        tracer = tracing.tracer()
        if tracer is None:
            return await self._load_and_cache(key, artifact, load_key, warm, None)
        # The `load` span: a child of the request that started this load (create_task copied
        # its context), current in the load thread too so the loader can annotate it.
        attributes = {"modelfleet.tenant": key[0], "modelfleet.version": key[1]}
        with tracer.start_as_current_span("load", attributes=attributes,
                                          record_exception=False) as span:  # its status says why it failed
            return await self._load_and_cache(key, artifact, load_key, warm, span)

    async def _load_and_cache(self, key: ModelKey, artifact: str | None, load_key: tuple, warm: bool,
                              span) -> LoadedModel:
        task = asyncio.current_task()
        try:
            try:
                model, ms = await self._run_load(key, artifact, span is not None)
            finally:
                self._inflight.pop(load_key, None)
                retired = task in self._retired_loads
                self._retired_loads.discard(task)
            if retired:  # it may have read the version record before gc removed it
                self._closer.submit(model.close)
                raise NotFound(f"tenant {key[0]!r} has no version {key[1]!r} (removed while it loaded)")
            if span is not None:
                tracing.set_attributes(span, {"bytes": model.nbytes, "load_seconds": ms / 1000})
            if self.observe_load is not None:  # every load that ran, also one too large to keep
                self.observe_load(ms / 1000)
            if model.nbytes > self.budget:  # a refusal, not a load: loads - models cached = evictions
                self._closer.submit(model.close)
                event(log, "model.too_large_to_cache", level=logging.WARNING, tenant=key[0], version=key[1],
                      bytes=model.nbytes, budget=self.budget)
                raise ResourceExhausted(f"tenant {key[0]!r} version {key[1]!r} needs {model.nbytes} bytes loaded, "
                                        f"more than this worker's whole model cache ({self.budget} bytes)")
        except Exception as exc:
            # a caller asking for a version that does not exist is no broken artifact: not counted
            # as a load failure, nor a warning an operator must chase (the caller hears NOT_FOUND)
            unknown = isinstance(exc, NotFound)
            if not isinstance(exc, (ResourceExhausted, NotFound)):
                self.counters.load_failures += 1
            backoff = self.failures.record(load_key, exc)
            event(log, "model.load_failed", level=logging.INFO if unknown else logging.WARNING, tenant=key[0],
                  version=key[1], error=str(exc), retry_in_s=backoff)
            raise
        self.counters.loads += 1
        self._load_counts[key] = self._load_counts.get(key, 0) + 1
        self.failures.forget(load_key)
        self._load_ms += (ms - self._load_ms) * 0.2
        replaced = self._models.pop(key)  # loaded meanwhile from another hint (or none)
        if replaced is not None:
            self._evicted(key, replaced)
        model.retain()  # the delivery hold: an eviction before the waiters' turn must not free it
        if asyncio.current_task() not in self._waiters:  # every waiter gave up meanwhile
            asyncio.get_running_loop().call_soon(model.release)
        self._models.put(key, model, admit=warm)
        self._last_used[key] = time.monotonic()
        event(log, "model.loaded", level=logging.DEBUG, tenant=key[0], version=key[1], bytes=model.nbytes,
              ms=round(ms, 2))
        return model

    def retire(self, keys: list[ModelKey]) -> int:
        """Drops versions gc removed (on the event loop): their cached models, freed as an
        eviction frees them (a request predicting with one finishes first), and any load of one
        in flight (see `_load_and_cache`). Returns how many cached models went."""
        gone = set(keys)
        dropped = 0
        for key in gone:
            model = self._models.pop(key)
            if model is None:
                continue
            self._evicted(key, model)
            self._load_counts.pop(key, None)
            dropped += 1
            event(log, "model.retired", tenant=key[0], version=key[1], bytes=model.nbytes)
        self._retired_loads.update(task for load_key, task in self._inflight.items() if load_key[:2] in gone)
        self.counters.retirements += dropped
        return dropped

    def idle_seconds(self, key: ModelKey) -> float:
        return time.monotonic() - self._last_used.get(key, 0.0)

    def _evicted(self, key: ModelKey, model: LoadedModel, refused: bool = False) -> None:
        self.counters.evictions += 1
        self.counters.admission_rejections += refused
        self._last_used.pop(key, None)
        self._closer.submit(model.close)  # if borrowed, its last user frees it instead

    def close(self) -> None:
        """Frees every cached model (worker shutdown)."""
        self._fetcher.shutdown(wait=False, cancel_futures=True)  # downloads hold no model; a hung one must not hold us
        self._pool.shutdown(wait=True, cancel_futures=True)
        while self._models:
            _, model = self._models.popitem()
            model.close()
        self._closer.shutdown(wait=True)
