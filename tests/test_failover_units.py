"""router.failover's race on fake worker calls: attempt timeouts, hedges, ejection, overload, accounting.

The fakes behave like grpc.aio unary calls (awaitable, done callbacks, cancel) and answer after
a scripted delay, so every timing here is a few tens of milliseconds and deterministic enough.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from modelfleet.errors import DeadlineExceeded, NotFound, Unavailable
from modelfleet.v1 import predictor_pb2
from router.counters import RouterCounters
from router.ejection import OutlierEjector
from router.failover import Failover
from router.hedging import HedgePolicy
from router.worker_pool import WorkerPool
from worker.overload import RETRY_AFTER_KEY, RetryLater


class FakeCall:
    def __init__(self, script: tuple) -> None:
        loop = asyncio.get_running_loop()
        self._future: asyncio.Future = loop.create_future()
        self._callbacks: list = []
        self.cancelled = False
        kind, delay, *rest = script
        if kind != "hang":
            loop.call_later(delay, self._finish, kind, rest)

    def _finish(self, kind: str, rest: list) -> None:
        if self._future.done():
            return
        if kind == "ok":
            self._future.set_result(predictor_pb2.PredictResponse(worker_id=rest[0]))
        else:
            code, trailing = rest[0], rest[1] if len(rest) > 1 else ()
            self._future.set_exception(grpc.aio.AioRpcError(code, grpc.aio.Metadata(),
                                                            grpc.aio.Metadata(*trailing), details=f"{code.name}!"))
        for callback in self._callbacks:
            callback(self)

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        if self._future.done():
            return False
        self.cancelled = True
        self._future.cancel()
        for callback in self._callbacks:
            callback(self)
        return True

    def __await__(self):
        return self._future.__await__()


class FakeStub:
    def __init__(self, worker_id: str, scripts: list[tuple]) -> None:
        self.worker_id = worker_id
        self.scripts = scripts
        self.calls: list[FakeCall] = []

    def Predict(self, request, timeout: float):
        call = FakeCall(self.scripts[min(len(self.calls), len(self.scripts) - 1)])
        self.calls.append(call)
        return call


def ok(delay: float, worker: str) -> tuple:
    return ("ok", delay, worker)


def err(delay: float, code: grpc.StatusCode, trailing=()) -> tuple:
    return ("err", delay, code, trailing)


HANG = ("hang", 0)


def setup(scripts: dict[str, list[tuple]], hedge: float | str = 0.0, eject_after: int = 3):
    counters = RouterCounters()
    pool = WorkerPool(OutlierEjector(eject_after, 1.0, 30.0, counters))
    stubs = {w: FakeStub(w, s) for w, s in scripts.items()}
    pool.stubs.update(stubs)
    return Failover(pool, 32, HedgePolicy(hedge), counters), pool, stubs, counters


REQUEST = predictor_pb2.PredictRequest(tenant_id="acme", version="v1", features=[0.0] * 8)


def run(coro):
    return asyncio.run(coro)


def balanced(pool: WorkerPool) -> bool:
    return all(n == 0 for n in pool.inflight.values())


def test_unavailable_fails_over_at_once():
    async def go():
        failover, pool, stubs, counters = setup({"a": [err(0, grpc.StatusCode.UNAVAILABLE)], "b": [ok(0, "b")]})
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "b"
        assert counters.retries == 1 and counters.attempts == 2 and balanced(pool)
    run(go())


def test_a_hung_member_costs_its_share_of_the_deadline_then_the_next_answers_and_it_is_cancelled():
    async def go():
        failover, pool, stubs, counters = setup({"a": [HANG], "b": [ok(0, "b")]})
        started = time.monotonic()
        assert (await failover.send(REQUEST, ("a", "b"), 0.4)).worker_id == "b"
        assert 0.18 <= time.monotonic() - started < 0.35  # half of 0.4 s, then b at once
        assert stubs["a"].calls[0].cancelled and counters.attempt_timeouts == 1 and balanced(pool)
    run(go())


def test_three_attempt_timeouts_eject_then_requests_go_straight_to_the_healthy_member():
    async def go():
        failover, pool, stubs, counters = setup({"a": [HANG], "b": [ok(0, "b")]})
        for _ in range(3):
            await failover.send(REQUEST, ("a", "b"), 0.3)
        assert pool.ejector.ejected() == ["a"] and counters.ejections == 1
        started = time.monotonic()
        assert (await failover.send(REQUEST, ("a", "b"), 0.3)).worker_id == "b"
        assert time.monotonic() - started < 0.1 and len(stubs["a"].calls) == 3  # a was not even tried
    run(go())


def test_a_slow_member_past_its_attempt_timeout_can_still_win():
    async def go():
        failover, pool, stubs, counters = setup({"a": [ok(0.4, "a")], "b": [ok(0.5, "b")]})  # a times out at 0.3 s
        assert (await failover.send(REQUEST, ("a", "b"), 0.6)).worker_id == "a"
        assert stubs["b"].calls[0].cancelled and balanced(pool)
        assert pool.ejector.ejected() == [] and not pool.ejector._states  # its answer cleared the timeout
    run(go())


def test_a_hedge_wins_over_a_slow_first_member_and_the_loser_is_cancelled_not_blamed():
    async def go():
        failover, pool, stubs, counters = setup({"a": [ok(0.3, "a")], "b": [ok(0.01, "b")]}, hedge=20.0)
        started = time.monotonic()
        assert (await failover.send(REQUEST, ("a", "b"), 2.0)).worker_id == "b"
        assert time.monotonic() - started < 0.15
        assert counters.hedges == 1 and counters.hedge_wins == 1 and stubs["a"].calls[0].cancelled
        assert not pool.ejector._states and balanced(pool)
    run(go())


def test_no_hedge_when_the_first_answers_in_time_or_hedging_is_off():
    async def go():
        failover, pool, stubs, counters = setup({"a": [ok(0.0, "a")], "b": [ok(0.0, "b")]}, hedge=50.0)
        for _ in range(10):
            assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "a"
        assert counters.hedges == 0 and stubs["b"].calls == []
        failover, pool, stubs, counters = setup({"a": [ok(0.1, "a")], "b": [ok(0.0, "b")]}, hedge=0.0)
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "a"
        assert counters.hedges == 0
    run(go())


def test_errors_about_the_request_are_returned_as_they_are_without_trying_another_member():
    async def go():
        failover, pool, stubs, counters = setup({"a": [err(0, grpc.StatusCode.NOT_FOUND)], "b": [ok(0, "b")]})
        with pytest.raises(NotFound, match="NOT_FOUND!"):
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert stubs["b"].calls == [] and balanced(pool)
    run(go())


def test_overloaded_members_are_skipped_and_all_overloaded_is_retry_later_with_the_largest_hint():
    async def go():
        busy = lambda ms: err(0, grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, str(ms)),))  # noqa: E731
        failover, pool, stubs, counters = setup({"a": [busy(30)], "b": [ok(0, "b")]})
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "b"
        failover, pool, stubs, counters = setup({"a": [busy(30)], "b": [busy(50)]})
        with pytest.raises(RetryLater) as info:
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert info.value.retry_after_ms == 50 and not pool.ejector._states  # busy is not broken
        too_big = err(0, grpc.StatusCode.RESOURCE_EXHAUSTED)  # no hint: retrying will not help
        failover, pool, stubs, counters = setup({"a": [too_big], "b": [ok(0, "b")]})
        with pytest.raises(Exception) as info:
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and stubs["b"].calls == []
    run(go())


def test_every_member_hung_is_deadline_exceeded_and_every_member_down_is_unavailable():
    async def go():
        failover, pool, stubs, counters = setup({"a": [HANG], "b": [HANG]})
        with pytest.raises(DeadlineExceeded, match="acme"):
            await failover.send(REQUEST, ("a", "b"), 0.2)
        assert all(c.cancelled for s in stubs.values() for c in s.calls) and balanced(pool)
        failover, pool, stubs, counters = setup({"a": [err(0, grpc.StatusCode.UNAVAILABLE)],
                                                 "b": [err(0, grpc.StatusCode.CANCELLED)]})
        with pytest.raises(Unavailable, match="a: UNAVAILABLE; b: CANCELLED"):
            await failover.send(REQUEST, ("a", "b"), 1.0)
        failover, pool, stubs, counters = setup({"b": [ok(0, "b")]})
        assert (await failover.send(REQUEST, ("gone", "b"), 1.0)).worker_id == "b"  # left the fleet: skipped
    run(go())


def test_a_caller_that_gives_up_cancels_every_attempt_and_keeps_the_books_balanced():
    async def go():
        failover, pool, stubs, counters = setup({"a": [HANG], "b": [HANG]}, hedge=10.0)
        task = asyncio.ensure_future(failover.send(REQUEST, ("a", "b"), 5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert all(c.cancelled for s in stubs.values() for c in s.calls) and balanced(pool)
    run(go())


def test_a_call_cancelled_under_the_request_by_its_closing_channel_fails_over():
    """The worker left the fleet: the pool closed its channel, which cancels the calls on it."""
    async def go():
        failover, pool, stubs, counters = setup({"a": [HANG], "b": [ok(0, "b")]})
        task = asyncio.ensure_future(failover.send(REQUEST, ("a", "b"), 2.0))
        await asyncio.sleep(0.02)
        stubs["a"].calls[0].cancel()
        assert (await task).worker_id == "b" and balanced(pool)
    run(go())
