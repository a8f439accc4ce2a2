"""Make-before-break: load a tenant's model where it is about to be served, before traffic moves.

When a shard gains a member (a worker joins, another is drained, a tenant's shard grows), the
tenants that were active in the last few minutes would each pay a cold load on the new member.
Workers' LRUs know who is active (`Stats(active_within_s)`); from that, the placements a change
creates, and `Worker.Warm` on each, the change only becomes visible once those loads are done.
Used by a joining worker (before it leaves `joining`), `workers drain` and `shards apply`.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping, Sequence

import grpc

from modelfleet import tls
from modelfleet.fanout import ask_all
from modelfleet.log import event
from modelfleet.v1 import worker_pb2, worker_pb2_grpc
from sharding import Member, shard_for
from version_service.schema import WorkerRecord
from worker.failure_scope import is_model_failure

log = logging.getLogger("modelfleet.rebalance")


@dataclass(frozen=True)
class Warmup:
    tenant: str
    version: str
    worker_id: str


# A Warm that ends with one of these, unless marked as the model's own failure, is about the
# worker: gone, hung, or not answering within the warm-up's deadline.
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass
class WarmupResult:
    """What a change's warm-ups did. `unreachable` counts, per worker, the failed warm-ups that
    say the worker itself could not be reached: make-before-break must not shift traffic onto it.
    The other failures (NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, a store the worker
    cannot reach) are the model's: they would fail on any worker, so they do not stop a change.
    `store_unreachable` counts those of them that were UNAVAILABLE (what the worker's loads need,
    the model store or etcd, could not be reached). `skipped`: warm-ups not waited for because
    run_warmups stopped early, and `stopped` why ("deadline", or what `stop_when` said)."""

    loaded: int = 0
    already_warm: int = 0
    failed: list[tuple[Warmup, str]] = field(default_factory=list)
    unreachable: dict[str, int] = field(default_factory=dict)
    store_unreachable: int = 0
    skipped: list[Warmup] = field(default_factory=list)
    stopped: str = ""

    @property
    def done(self) -> int:
        return self.loaded + self.already_warm + len(self.failed)


def worker_unreachable(exc: grpc.RpcError | LookupError) -> bool:
    """Whether a failed Warm says its worker could not be reached (not registered, UNAVAILABLE or
    DEADLINE_EXCEEDED from the transport), as against the model failing to load. A worker's own
    UNAVAILABLE about one model (its store or etcd is away) carries the model-failure mark."""
    if isinstance(exc, LookupError):
        return True
    if not isinstance(exc, grpc.Call):
        return False
    return exc.code() in UNREACHABLE_CODES and not is_model_failure(exc.trailing_metadata())


def active_models(workers: Iterable[WorkerRecord], within_s: float, timeout: float = 5.0,
                  credentials: grpc.ChannelCredentials | None = None) -> dict[str, set[str]]:
    """tenant -> versions some worker served within `within_s` seconds, every worker asked at once
    (a hung one costs `timeout` once, not once each). Unreachable workers are skipped."""
    active: dict[str, set[str]] = {}
    request = worker_pb2.StatsRequest(include_models=True, active_within_s=max(within_s, 1e-9))

    def stats(channel: grpc.Channel, t: float) -> grpc.Future:
        return worker_pb2_grpc.WorkerStub(channel).Stats.future(request, timeout=t)

    answers, errors = ask_all({w.worker_id: (w.address, stats) for w in workers}, timeout, credentials)
    for worker_id, exc in sorted(errors.items()):
        event(log, "rebalance.stats_failed", level=logging.WARNING, worker=worker_id,
              error=exc.code().name)  # type: ignore[attr-defined]
    for answer in answers.values():
        for model in answer.models:
            active.setdefault(model.tenant_id, set()).add(model.version)
    return active


def warmups_for(active: Mapping[str, set[str]], tenants: Collection[str], sizes: Mapping[str, int],
                before: Sequence[Member], after: Sequence[Member], default_k: int,
                sizes_after: Mapping[str, int] | None = None) -> list[Warmup]:
    """The (tenant, version, worker) loads a change needs: new placements of active tenants, and
    a new first member even when it was in the shard before. Routers send a tenant's traffic to
    its first member (affinity), so only that one holds the model; the old second member that
    a drain promotes to first has never loaded it.

    `tenants` are the registered ones, `sizes` their shard-size overrides (others: default_k).
    """
    sizes_after = sizes_after or {}
    warmups = []
    for tenant in sorted(active):
        if tenant not in tenants:
            continue
        k_before = sizes.get(tenant, default_k)
        k_after = sizes_after.get(tenant, k_before)
        old = shard_for(tenant, before, k_before)
        for position, worker_id in enumerate(shard_for(tenant, after, k_after)):
            if worker_id not in old or (position == 0 and old[:1] != (worker_id,)):
                warmups.extend(Warmup(tenant, version, worker_id) for version in sorted(active[tenant]))
    return warmups


def run_warmups(warmups: Sequence[Warmup], addresses: Mapping[str, str], concurrency: int = 8,
                timeout: float = 30.0, on_progress: Callable[[WarmupResult, int], None] | None = None,
                credentials: grpc.ChannelCredentials | None = None, deadline: float | None = None,
                stop_when: Callable[[WarmupResult], str | None] | None = None) -> WarmupResult:
    """Calls Worker.Warm for each placement, `concurrency` at a time, each within `timeout`
    seconds (a hung worker fails as DEADLINE_EXCEEDED, i.e. unreachable); never raises for one failure.

    Without `deadline` and `stop_when` it waits for every warm-up (make-before-break commits only
    then). A joining worker bounds its wait: at `deadline` (a time.monotonic() value), or once
    `stop_when(result)`, checked after each finished warm-up, gives a reason, the warm-ups not yet
    finished are skipped: those not started never start, those in flight are cancelled (a
    worker's load that a cancelled Warm started goes on, as a request's load would)."""
    result = WarmupResult()
    if not warmups:
        return result
    channels = {w: tls.channel(addresses[w], credentials, aio=False)
                for w in {wu.worker_id for wu in warmups} if w in addresses}
    stubs = {w: worker_pb2_grpc.WorkerStub(c) for w, c in channels.items()}

    def warm(wu: Warmup) -> bool:
        stub = stubs.get(wu.worker_id)
        if stub is None:
            raise LookupError(f"worker {wu.worker_id} is not registered")
        return stub.Warm(worker_pb2.WarmRequest(tenant_id=wu.tenant, version=wu.version), timeout=timeout).loaded

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    futures = {pool.submit(warm, wu): wu for wu in warmups}
    finished = set()
    wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        for future in as_completed(futures, timeout=wait_s):
            finished.add(future)
            _record(result, futures[future], future)
            if on_progress is not None:
                on_progress(result, len(warmups))
            reason = stop_when(result) if stop_when is not None else None
            if reason:
                result.stopped = reason
                break
    except TimeoutError:  # as_completed's, at the deadline
        result.stopped = "deadline"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a stop: what has not started never starts
        for channel in channels.values():
            channel.close()  # ends the calls still in flight (after a stop) at once, CANCELLED
        pool.shutdown(wait=True)
    result.skipped = [wu for future, wu in futures.items() if future not in finished]
    event(log, "rebalance.warmed", placements=len(warmups), loaded=result.loaded, already_warm=result.already_warm,
          failed=len(result.failed), unreachable=",".join(sorted(result.unreachable)), skipped=len(result.skipped),
          stopped=result.stopped)
    return result


def _record(result: WarmupResult, wu: Warmup, future: Future) -> None:
    """Adds one finished warm-up's outcome to `result`."""
    try:
        if future.result():
            result.loaded += 1
        else:
            result.already_warm += 1
    except (grpc.RpcError, LookupError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        result.failed.append((wu, detail or "failed"))
        if worker_unreachable(exc):
            result.unreachable[wu.worker_id] = result.unreachable.get(wu.worker_id, 0) + 1
        elif isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
            result.store_unreachable += 1  # the model-failure mark: the worker's store (or etcd) is away
