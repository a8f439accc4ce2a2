"""Forwarding one Predict to a tenant's shard: failover within the deadline, attempt timeouts, hedges.

The members are tried in order (affinity and spill from WorkerPool, ejected workers last). An
attempt ends the request when it answers, or when it fails with an error about the request
itself (unknown version, bad features, corrupt artifact: every member would say the same).
It makes way for the next member when:

- it fails with UNAVAILABLE or CANCELLED (a dead, leaving or restarting worker), DEADLINE_EXCEEDED
  with time left, or RESOURCE_EXHAUSTED carrying `retry-after-ms` (an overloaded worker): the
  next member is tried at once;
- it passes its *attempt timeout* without an answer: min(remaining, max(ATTEMPT_FLOOR_S,
  remaining / members left)). With a 2 s deadline and two members, a hung first member (SIGSTOP)
  costs 1 s, and the second still has 1 s. The slow attempt is not cancelled: it stays in the
  race, so a member that was merely slow (a cold load) can still win;
- it passes the hedge delay (router.hedging; off unless --hedge-after-ms): the next member gets
  the same request as a hedge, within the hedge budget, never to an ejected worker.

The first answer wins and every other outstanding attempt is cancelled. Failures and attempt
timeouts feed the outlier ejector; a hedge that loses is not a failure.

With tracing on (modelfleet.tracing), each attempt is a `forward` span (worker, attempt = its
1-based place in the member order, hedge, gRPC status code; `lost` when cancelled as a loser)
whose context reaches the worker as `traceparent`; with it off, no metadata is added.

Invariants:
- never more attempts than members, each member at most once per request;
- every attempt's gRPC deadline is the caller's, so nothing outlives the request;
- `pool.inflight[w]` is incremented when an attempt starts and decremented exactly once when
  it ends (answered, failed or cancelled);
- an attempt timeout counts against a worker only when it happens with time left; running out
  of the caller's deadline is not the worker's fault.
"""
from __future__ import annotations

import asyncio

import grpc

from modelfleet import errors, tracing
from modelfleet.errors import DeadlineExceeded, Unavailable
from modelfleet.v1 import predictor_pb2
from router.counters import RouterCounters
from router.hedging import HedgePolicy
from router.worker_pool import WorkerPool
from worker.failure_scope import is_model_failure
from worker.overload import RetryLater, retry_hint

ATTEMPT_FLOOR_S = 0.1  # no attempt timeout shorter than this: short deadlines go to one member
_TIME_LEFT_S = 0.005  # less than this left counts as the caller's deadline, not the worker's

_FAILOVER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_DETAILS_CHARS = 300  # of each member's message in an "every worker ... failed" error


class _Attempt:
    __slots__ = ("worker_id", "call", "started", "soft_deadline", "hedge", "timed_out", "span")

    def __init__(self, worker_id: str, call, started: float, soft_deadline: float | None, hedge: bool,
                 span=None) -> None:
        self.worker_id = worker_id
        self.call = call
        self.started = started
        self.soft_deadline = soft_deadline  # None: this attempt has the whole remaining budget
        self.hedge = hedge
        self.timed_out = False
        self.span = span  # its `forward` span while tracing is on, else None


class _Wake:
    """One future at a time that call completions and the timer resolve."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future | None = None

    def __call__(self, *_) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)


class Failover:
    def __init__(self, pool: WorkerPool, spill_inflight: int, hedging: HedgePolicy | None = None,
                 counters: RouterCounters | None = None) -> None:
        self.pool = pool
        self.spill_inflight = spill_inflight
        self.hedging = hedging if hedging is not None else HedgePolicy()
        self.counters = counters if counters is not None else RouterCounters()
        self.tracer = tracing.tracer()  # None while tracing is off

    async def send(self, request: predictor_pb2.PredictRequest, shard: tuple[str, ...], budget_s: float,
                   hedge: bool = True, artifact: str | None = None) -> predictor_pb2.PredictResponse:
        """The first answer from the shard's members, or the error that explains why none came.

        `artifact`: the requested version's artifact digest, when the route names it; sent in
        the request (worker.artifact_hint) so a worker that misses loads it without etcd. The
        router owns that field: whatever a caller put there is replaced."""
        pool, ejector, counters, tracer = self.pool, self.pool.ejector, self.counters, self.tracer
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + budget_s
        order, probes = ejector.order_with_probes(pool.choose_order(shard, self.spill_inflight))
        request.artifact_sha256 = artifact or ""
        hedge_delay = self.hedging.delay() if hedge and len(order) > 1 else None
        hedge_at = None if hedge_delay is None else now + hedge_delay
        outstanding: list[_Attempt] = []
        failures: list[str] = []
        overloaded_ms: list[int] = []
        wake = _Wake()
        next_index = 0
        timer = None

        def launch(now: float, as_hedge: bool) -> bool:
            nonlocal next_index
            while next_index < len(order):
                worker_id = order[next_index]
                next_index += 1
                predictor = pool.predictors.get(worker_id)
                if predictor is None:
                    failures.append(f"{worker_id}: left the fleet")
                    continue
                remaining = deadline - now
                share = max(ATTEMPT_FLOOR_S, remaining / (len(order) - next_index + 1))
                soft = now + share if share < remaining - _TIME_LEFT_S else None
                if tracer is None:
                    span = None
                    call = predictor.Predict(request, timeout=remaining)
                else:  # a `forward` span per attempt; the worker continues it from `traceparent`
                    span, metadata = tracing.start_forward(tracer, worker_id, next_index, as_hedge)
                    call = predictor.Predict(request, timeout=remaining, metadata=metadata)
                call.add_done_callback(wake)
                pool.inflight[worker_id] = pool.inflight.get(worker_id, 0) + 1
                outstanding.append(_Attempt(worker_id, call, now, soft, as_hedge, span))
                counters.attempts += 1
                if as_hedge:
                    counters.hedges += 1
                elif next_index > 1:
                    counters.retries += 1
                return True
            return False

        def finished(attempt: _Attempt) -> None:
            outstanding.remove(attempt)
            pool.inflight[attempt.worker_id] -= 1

        try:
            launch(now, False)
            if outstanding and outstanding[0].soft_deadline is None and hedge_at is None:
                # Nothing can happen before this attempt ends (one member, or too little time to
                # share): wait on the call alone, with no timer and no wake-up future, then let
                # the loop below take its outcome as it takes any ended attempt's. That saves a
                # timer, a future and one event-loop turn: ~7 of the ~14 µs per request that
                # send() costs on top of awaiting the call (2 cores).
                try:
                    await outstanding[0].call
                except grpc.aio.AioRpcError:
                    pass
                except asyncio.CancelledError:
                    if (task := asyncio.current_task()) is not None and task.cancelling():
                        raise  # the caller is gone; the finally below cancels the call
            while outstanding:
                # 1. every attempt that has ended: an answer wins; a failure makes way for the next.
                for attempt in [a for a in outstanding if a.call.done()]:
                    finished(attempt)
                    try:
                        response = await attempt.call  # done: returns or raises at once
                    except grpc.aio.AioRpcError as exc:
                        code, hint, model_failure = exc.code(), None, False
                        if attempt.span is not None:
                            tracing.end_forward(attempt.span, code.name)
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            hint = retry_hint(exc.trailing_metadata())
                        elif code == grpc.StatusCode.UNAVAILABLE:
                            model_failure = is_model_failure(exc.trailing_metadata())
                        if not self._may_retry(attempt, code, exc.details(), hint, model_failure,
                                               deadline - loop.time(), failures, overloaded_ms):
                            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                                continue  # the caller's deadline: nothing left to try with
                            raise _passthrough(exc) from None
                    except asyncio.CancelledError:
                        # Not us (a done call never suspends): its channel closed under it, the
                        # worker left the fleet while this request was on it.
                        caller_gone = (task := asyncio.current_task()) is not None and task.cancelling()
                        if attempt.span is not None:
                            tracing.end_forward(attempt.span, "CANCELLED", "lost" if caller_gone else "channel closed")
                        if caller_gone:
                            raise
                        failures.append(f"{attempt.worker_id}: channel closed")
                    else:
                        if attempt.span is not None:
                            tracing.end_forward(attempt.span, "OK")
                        ejector.success(attempt.worker_id)
                        self.hedging.observe(loop.time() - attempt.started)
                        if attempt.hedge:
                            counters.hedge_wins += 1
                        return response
                    if all(a.timed_out for a in outstanding):  # nobody left within its time: next
                        launch(loop.time(), False)
                if not outstanding:
                    break
                # 2. attempt timeouts and the hedge: each sends the request to the next member.
                now = loop.time()
                if now >= deadline:
                    break
                for attempt in list(outstanding):
                    if not attempt.timed_out and attempt.soft_deadline is not None and now >= attempt.soft_deadline:
                        attempt.timed_out = True
                        counters.attempt_timeouts += 1
                        if attempt.span is not None:
                            attempt.span.add_event("attempt_timeout")
                        ejector.failure(attempt.worker_id, "attempt timeout")
                        failures.append(f"{attempt.worker_id}: no answer in "
                                        f"{(attempt.soft_deadline - attempt.started) * 1000:.0f} ms")
                        launch(now, False)
                if hedge_at is not None and now >= hedge_at:
                    hedge_at = None
                    if next_index < len(order) and not ejector.is_ejected(order[next_index]) \
                            and self.hedging.take():
                        launch(now, True)
                # 3. sleep until an attempt ends, an attempt timeout, the hedge, or the deadline.
                wake_at = deadline
                for attempt in outstanding:
                    if not attempt.timed_out and attempt.soft_deadline is not None:
                        wake_at = min(wake_at, attempt.soft_deadline)
                if hedge_at is not None:
                    wake_at = min(wake_at, hedge_at)
                if any(a.call.done() for a in outstanding):
                    continue
                wake.future = loop.create_future()
                timer = loop.call_at(wake_at, wake)
                try:
                    await wake.future
                finally:
                    timer.cancel()
                    wake.future = None
        finally:
            for attempt in outstanding:  # the losers and the hung: nobody waits for them any more
                attempt.call.cancel()
                if attempt.span is not None:
                    tracing.end_forward(attempt.span, "CANCELLED", "lost")
                pool.inflight[attempt.worker_id] -= 1
                if attempt.worker_id in probes:
                    ejector.abandoned(attempt.worker_id)
            if probes:
                for worker_id in order[next_index:]:  # a probe handed out but never sent
                    if worker_id in probes:
                        ejector.abandoned(worker_id)
            outstanding.clear()

        tenant = request.tenant_id
        if loop.time() >= deadline - _TIME_LEFT_S:
            raise DeadlineExceeded(f"deadline exceeded for tenant {tenant!r} after trying "
                                   f"{'; '.join(failures) or 'no worker'}")
        if overloaded_ms and len(overloaded_ms) == len(failures):
            raise RetryLater(f"every worker in the shard of tenant {tenant!r} is overloaded", max(overloaded_ms))
        raise Unavailable(f"every worker in the shard of tenant {tenant!r} failed: {'; '.join(failures)}"
                          if failures else f"no live worker in the shard of tenant {tenant!r}")

    async def send_shadow(self, request: predictor_pb2.PredictRequest, worker_id: str, budget_s: float,
                          artifact: str | None = None) -> predictor_pb2.PredictResponse | None:
        """A shadow rollout's copy, to one member and outside the shard's books; None when not sent.

        The copy is the router's experiment, not a caller's request, so what becomes of it says
        nothing the router should act on: a shadow version's first load of a big model is slow by
        nature. So it feeds neither the ejector (three slow shadows would eject a healthy worker
        from every shard) nor the `auto` hedge delay; it never fails over or hedges (the shadow
        version would load on a second member too), never carries an ejected worker's probe, and
        is not sent to an ejected or departed member (None). It does count in the member's
        in-flight requests, which spill reads: it is load on that worker all the same. With
        tracing on it is a `forward` span marked `modelfleet.shadow`, in the request's trace."""
        pool = self.pool
        predictor = pool.predictors.get(worker_id)
        if predictor is None or pool.ejector.is_ejected(worker_id):
            return None
        request.artifact_sha256 = artifact or ""
        pool.inflight[worker_id] = pool.inflight.get(worker_id, 0) + 1
        call = span = None
        try:
            if self.tracer is None:
                call = predictor.Predict(request, timeout=budget_s)
            else:
                span, metadata = tracing.start_forward(self.tracer, worker_id, 1, False)
                tracing.set_attributes(span, {"shadow": True})
                call = predictor.Predict(request, timeout=budget_s, metadata=metadata)
            response = await call
        except grpc.aio.AioRpcError as exc:
            if span is not None:
                tracing.end_forward(span, exc.code().name)
            raise _passthrough(exc) from None
        except asyncio.CancelledError:
            closing = (task := asyncio.current_task()) is not None and task.cancelling()
            if span is not None:
                tracing.end_forward(span, "CANCELLED", "lost" if closing else "channel closed")
            if closing:
                if call is not None:  # a streamed frame's canceller tells the worker (router.worker_stream)
                    call.cancel()
                raise  # the router is closing
            raise Unavailable(f"{worker_id}: channel closed") from None  # it left the fleet meanwhile
        finally:
            pool.inflight[worker_id] -= 1
        if span is not None:
            tracing.end_forward(span, "OK")
        return response

    def _may_retry(self, attempt: _Attempt, code: grpc.StatusCode, details: str, hint: int | None,
                   model_failure: bool, time_left: float, failures: list[str], overloaded_ms: list[int]) -> bool:
        """Whether a failed attempt makes way for the next member (recording why), or ends the request.
        `model_failure`: the worker said its UNAVAILABLE is about the model's load (the store or etcd
        unreachable, worker.failure_scope): the next member may manage, and the worker is not at fault."""
        worker_id = attempt.worker_id
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and time_left <= _TIME_LEFT_S:
            failures.append(f"{worker_id}: no answer before the deadline")
            return False
        if code in _FAILOVER or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if model_failure:
                self.pool.ejector.success(worker_id)  # it answered: alive
            elif not attempt.timed_out:  # a timed-out attempt was counted against its worker already
                self.pool.ejector.failure(worker_id, code.name)
            # A worker's word on its model (the store or etcd unreachable) is the caller's business;
            # a transport's message (internal addresses, gRPC internals) is not.
            failures.append(f"{worker_id}: {code.name}" + (f" ({details[:_DETAILS_CHARS]})" if model_failure and details
                                                            else ""))
            return True
        if hint is not None:  # RESOURCE_EXHAUSTED with a retry hint: busy, not broken
            overloaded_ms.append(hint)
            failures.append(f"{worker_id}: overloaded")
            return True
        self.pool.ejector.success(worker_id)  # it answered: alive; the request itself is at fault
        return False


def _passthrough(exc: grpc.aio.AioRpcError) -> Exception:
    """The worker's status and message, unchanged, as a ModelfleetError the front end translates."""
    for cls in (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition, errors.ResourceExhausted,
                errors.DeadlineExceeded, errors.AlreadyExists, errors.Conflict):
        if cls.code == exc.code():
            return cls(exc.details() or exc.code().name)
    error = errors.ModelfleetError(exc.details() or exc.code().name)
    error.code = exc.code()
    return error
