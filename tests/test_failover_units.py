"""router.failover's race on scripted workers: attempt timeouts, hedges, ejection, overload, accounting.

Each worker here is a real grpc.aio server (tests.scripted_worker) that the router reaches through
a real WorkerPool, channel and stub; only its behaviour is scripted (answer after a delay, fail with
a code and trailing metadata, hang until cancelled), so every behaviour is deterministic and every
timing a few tens of milliseconds. What the workers saw (each call, and whether it was cancelled)
is recorded server-side; cancellations arrive asynchronously, so tests wait for them with a deadline.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import re
import time

import grpc
import pytest

from modelfleet.errors import DeadlineExceeded, NotFound, Unavailable
from router.counters import RouterCounters
from router.ejection import OutlierEjector
from router.failover import Failover
from router.hedging import HedgePolicy
from router.worker_pool import WorkerPool
from tests.scripted_worker import HANG, REQUEST, ScriptedFleet, err, ok
from version_service.schema import WorkerRecord, started_stamp
from worker.failure_scope import FAILURE_KEY, MODEL
from worker.overload import RETRY_AFTER_KEY, RetryLater


@pytest.fixture(params=["stream", "unary"])
def run(request):
    """Runs `test(setup, fleet)` in a fresh event loop; every scripted worker and channel closes after.

    Every test runs twice: with Predicts as frames on a stream per worker (router.worker_stream),
    and as unary calls (big batches, older workers, --worker-transport unary)."""
    return lambda test: _run(test, request.param)


def _run(test, transport: str) -> None:
    async def main():
        async with ScriptedFleet(transport) as fleet:
            async def setup(scripts: dict[str, list[tuple]], hedge: float | str = 0.0, eject_after: int = 3):
                counters = RouterCounters()
                pool, workers = await fleet.start(scripts, OutlierEjector(eject_after, 1.0, 30.0, counters))
                return Failover(pool, 32, HedgePolicy(hedge), counters), pool, workers, counters
            await test(setup, fleet)
    asyncio.run(main())


def balanced(pool: WorkerPool) -> bool:
    return all(n == 0 for n in pool.inflight.values())


def cancelled(worker) -> bool:
    """The router cancelled every call this worker received, each with time left on its deadline
    (so the cancel came from the router, not from the call's own gRPC deadline)."""
    return bool(worker.calls) and all(c.cancelled_early() for c in worker.calls)


def test_unavailable_fails_over_at_once(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [err(0, grpc.StatusCode.UNAVAILABLE)],
                                                         "b": [ok(0, "b")]})
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "b"
        assert counters.retries == 1 and counters.attempts == 2 and balanced(pool)
        assert len(workers["a"].calls) == len(workers["b"].calls) == 1
    run(go)


def test_a_hung_member_costs_its_share_of_the_deadline_then_the_next_answers_and_it_is_cancelled(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [HANG], "b": [ok(0, "b")]})
        started = time.monotonic()
        assert (await failover.send(REQUEST, ("a", "b"), 0.4)).worker_id == "b"
        assert 0.18 <= time.monotonic() - started < 0.35  # half of 0.4 s, then b at once
        assert counters.attempt_timeouts == 1 and balanced(pool)
        await fleet.until(lambda: cancelled(workers["a"]), "a's hung call to be cancelled")
    run(go)


def test_three_attempt_timeouts_eject_then_requests_go_straight_to_the_healthy_member(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [HANG], "b": [ok(0, "b")]})
        for _ in range(3):
            await failover.send(REQUEST, ("a", "b"), 0.3)
        assert pool.ejector.ejected() == ["a"] and counters.ejections == 1
        started = time.monotonic()
        assert (await failover.send(REQUEST, ("a", "b"), 0.3)).worker_id == "b"
        assert time.monotonic() - started < 0.1 and len(workers["a"].calls) == 3  # a was not even tried
        assert len(workers["b"].calls) == 4
    run(go)


def test_a_slow_member_past_its_attempt_timeout_can_still_win(run):
    async def go(setup, fleet):
        # a times out at 0.3 s
        failover, pool, workers, counters = await setup({"a": [ok(0.4, "a")], "b": [ok(0.5, "b")]})
        assert (await failover.send(REQUEST, ("a", "b"), 0.6)).worker_id == "a"
        assert balanced(pool)
        assert pool.ejector.ejected() == [] and not pool.ejector._states  # its answer cleared the timeout
        await fleet.until(lambda: cancelled(workers["b"]), "b's losing call to be cancelled")
    run(go)


def test_a_hedge_wins_over_a_slow_first_member_and_the_loser_is_cancelled_not_blamed(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [ok(0.3, "a")], "b": [ok(0.01, "b")]}, hedge=20.0)
        started = time.monotonic()
        assert (await failover.send(REQUEST, ("a", "b"), 2.0)).worker_id == "b"
        assert time.monotonic() - started < 0.15
        assert counters.hedges == 1 and counters.hedge_wins == 1
        assert not pool.ejector._states and balanced(pool)
        await fleet.until(lambda: cancelled(workers["a"]), "a's losing call to be cancelled")
    run(go)


def test_no_hedge_when_the_first_answers_in_time_or_hedging_is_off(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [ok(0.0, "a")], "b": [ok(0.0, "b")]}, hedge=50.0)
        for _ in range(10):
            assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "a"
        assert counters.hedges == 0 and workers["b"].calls == []
        failover, pool, workers, counters = await setup({"a": [ok(0.1, "a")], "b": [ok(0.0, "b")]}, hedge=0.0)
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "a"
        assert counters.hedges == 0 and workers["b"].calls == []
    run(go)


def test_errors_about_the_request_are_returned_as_they_are_without_trying_another_member(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [err(0, grpc.StatusCode.NOT_FOUND)],
                                                         "b": [ok(0, "b")]})
        with pytest.raises(NotFound, match="NOT_FOUND!"):
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert workers["b"].calls == [] and balanced(pool)
    run(go)


def test_overloaded_members_are_skipped_and_all_overloaded_is_retry_later_with_the_largest_hint(run):
    async def go(setup, fleet):
        busy = lambda ms: err(0, grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, str(ms)),))  # noqa: E731
        failover, pool, workers, counters = await setup({"a": [busy(30)], "b": [ok(0, "b")]})
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "b"
        failover, pool, workers, counters = await setup({"a": [busy(30)], "b": [busy(50)]})
        with pytest.raises(RetryLater) as info:
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert info.value.retry_after_ms == 50 and not pool.ejector._states  # busy is not broken
        too_big = err(0, grpc.StatusCode.RESOURCE_EXHAUSTED)  # no hint: retrying will not help
        failover, pool, workers, counters = await setup({"a": [too_big], "b": [ok(0, "b")]})
        with pytest.raises(Exception) as info:
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and workers["b"].calls == []
    run(go)


def test_every_member_hung_is_deadline_exceeded_and_every_member_down_is_unavailable(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [HANG], "b": [HANG]})
        with pytest.raises(DeadlineExceeded, match="acme"):
            await failover.send(REQUEST, ("a", "b"), 0.2)
        assert balanced(pool)
        await fleet.until(lambda: all(w.calls and all(c.cancelled for c in w.calls) for w in workers.values()),
                          "both hung calls to be cancelled")  # at the deadline: the router's or gRPC's
        failover, pool, workers, counters = await setup({"a": [err(0, grpc.StatusCode.UNAVAILABLE)],
                                                         "b": [err(0, grpc.StatusCode.CANCELLED)]})
        with pytest.raises(Unavailable, match=re.escape("a: UNAVAILABLE; b: CANCELLED")):
            await failover.send(REQUEST, ("a", "b"), 1.0)
        failover, pool, workers, counters = await setup({"b": [ok(0, "b")]})
        assert (await failover.send(REQUEST, ("gone", "b"), 1.0)).worker_id == "b"  # left the fleet: skipped
    run(go)


def test_a_model_failure_fails_over_without_blaming_the_worker_and_its_message_reaches_the_caller(run):
    """UNAVAILABLE marked as the model's (the store or etcd unreachable for its load) tries the next
    member but never ejects: the worker is healthy for every other tenant."""
    async def go(setup, fleet):
        store_down = err(0, grpc.StatusCode.UNAVAILABLE, ((FAILURE_KEY, MODEL),))
        failover, pool, workers, counters = await setup({"a": [store_down], "b": [ok(0, "b")]}, eject_after=1)
        for _ in range(3):
            assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "b"
        assert pool.ejector.ejected() == [] and counters.ejections == 0 and len(workers["a"].calls) == 3
        failover, pool, workers, counters = await setup({"a": [store_down], "b": [store_down]}, eject_after=1)
        with pytest.raises(Unavailable, match=re.escape("a: UNAVAILABLE (UNAVAILABLE!); b: UNAVAILABLE (UNAVAILABLE!)")):
            await failover.send(REQUEST, ("a", "b"), 1.0)
        assert pool.ejector.ejected() == []
        failover, pool, workers, counters = await setup({"a": [err(0, grpc.StatusCode.UNAVAILABLE)],
                                                         "b": [ok(0, "b")]}, eject_after=1)
        await failover.send(REQUEST, ("a", "b"), 1.0)
        assert pool.ejector.ejected() == ["a"]  # unmarked: the worker's own failure
    run(go)


def test_shadow_copies_stay_outside_the_shards_books(run):
    """A shadow rollout's copies (router.rollout) went through send() narrowed to one member: their
    failures ejected the worker from every shard, a copy could carry an ejected worker's probe, and
    their answer times set the auto hedge delay. send_shadow keeps them out of all three."""
    async def go(setup, fleet):
        down = err(0, grpc.StatusCode.UNAVAILABLE)
        failover, pool, workers, counters = await setup({"a": [down, down, down, ok(0.05, "a"), HANG],
                                                         "b": [ok(0, "b")]}, hedge="auto", eject_after=1)
        for _ in range(3):
            with pytest.raises(Exception, match="UNAVAILABLE"):
                await failover.send_shadow(REQUEST, "a", 1.0)
        assert pool.ejector.ejected() == [] and counters.attempts == 0 and balanced(pool)
        assert (await failover.send_shadow(REQUEST, "a", 1.0)).worker_id == "a"
        assert not failover.hedging._sample  # a shadow's answer time is not the shard's
        assert (await failover.send(REQUEST, ("a", "b"), 0.3)).worker_id == "b"  # a hangs: a real failure
        assert pool.ejector.ejected() == ["a"]
        assert await failover.send_shadow(REQUEST, "a", 1.0) is None  # not sent to an ejected member
        assert len(workers["a"].calls) == 5 and counters.probes == 0 and balanced(pool)
        assert await failover.send_shadow(REQUEST, "gone", 1.0) is None
    run(go)


def test_a_shadow_copy_cancelled_with_the_router_is_cancelled_at_the_worker(run):
    """Rollouts.close (the router stopping) cancels the copies in flight. On a stream the frame's
    canceller must say so (router.worker_stream): the worker went on with the copy until its
    deadline, and the frame stayed pending on the stream."""
    async def go(setup, fleet):
        failover, pool, workers, _ = await setup({"a": [HANG]})
        copy = asyncio.ensure_future(failover.send_shadow(REQUEST, "a", 5.0))
        await fleet.until(lambda: len(workers["a"].calls) == 1, "the copy to reach a")
        copy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copy
        await fleet.until(lambda: cancelled(workers["a"]), "a to hear the copy was cancelled")
        assert balanced(pool)
    run(go)


def test_requests_answered_elsewhere_while_a_probe_is_out_send_no_second_probe(run):
    """One probe per ejected worker at a time: requests that put the ejected worker last and are
    answered by another member must not free the probe they never held."""
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [HANG], "b": [ok(0, "b")]}, eject_after=1)
        await failover.send(REQUEST, ("a", "b"), 0.3)  # a's attempt times out: ejected for 1 s
        assert pool.ejector.ejected() == ["a"]
        await fleet.until(lambda: pool.ejector._states["a"].ejected_until <= time.monotonic(), "the back-off to end")
        probe = asyncio.ensure_future(failover.send(REQUEST, ("a", "b"), 2.0))  # a first: the probe, hung
        await fleet.until(lambda: len(workers["a"].calls) == 2, "the probe to reach a")
        for _ in range(5):
            assert (await failover.send(REQUEST, ("a", "b"), 2.0)).worker_id == "b"
        assert len(workers["a"].calls) == 2 and counters.probes == 1
        assert (await probe).worker_id == "b"
    run(go)


def test_a_caller_that_gives_up_cancels_every_attempt_and_keeps_the_books_balanced(run):
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [HANG], "b": [HANG]}, hedge=10.0)
        task = asyncio.ensure_future(failover.send(REQUEST, ("a", "b"), 5.0))
        await fleet.until(lambda: all(w.calls for w in workers.values()), "the request and its hedge to arrive")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert balanced(pool)
        await fleet.until(lambda: all(cancelled(w) for w in workers.values()), "both calls to be cancelled")
    run(go)


def test_a_call_cancelled_under_the_request_by_its_closing_channel_fails_over(run):
    """The worker left the fleet: the pool closed its channel, which cancels the calls on it."""
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [HANG], "b": [ok(0, "b")]})
        task = asyncio.ensure_future(failover.send(REQUEST, ("a", "b"), 2.0))
        await fleet.until(lambda: workers["a"].calls, "the request to reach a")
        (stale,) = pool.update({"b": WorkerRecord(worker_id="b", address=workers["b"].address)})  # a left
        await stale.close()
        assert (await task).worker_id == "b" and balanced(pool)
        await fleet.until(lambda: cancelled(workers["a"]), "a's call to be cancelled by its closing channel")
    run(go)


def test_a_lone_member_is_awaited_alone_with_the_same_outcomes_and_books(run):
    """One member (or too little time to share): send() awaits the call itself, no timer."""
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [ok(0, "a"), err(0, grpc.StatusCode.UNAVAILABLE),
                                                               HANG, HANG, HANG]})
        assert (await failover.send(REQUEST, ("a",), 1.0)).worker_id == "a"
        with pytest.raises(Unavailable, match="a: UNAVAILABLE"):
            await failover.send(REQUEST, ("a",), 1.0)
        with pytest.raises(DeadlineExceeded, match="acme"):
            await failover.send(REQUEST, ("a",), 0.2)
        task = asyncio.ensure_future(failover.send(REQUEST, ("a",), 5.0))
        await fleet.until(lambda: len(workers["a"].calls) == 4, "the fourth call to arrive")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await fleet.until(lambda: workers["a"].calls[3].cancelled_early(), "the caller's cancel to reach a")
        task = asyncio.ensure_future(failover.send(REQUEST, ("a",), 5.0))
        await fleet.until(lambda: len(workers["a"].calls) == 5, "the fifth call to arrive")
        (stale,) = pool.update({})  # a left the fleet: its closing channel cancels the call
        await stale.close()
        with pytest.raises(Unavailable, match="a: channel closed"):
            await task
        assert balanced(pool) and counters.attempts == 5 and counters.retries == 0
    run(go)


def test_a_worker_restarted_within_the_same_second_is_a_new_process_to_the_pool(run):
    """Routers tell one worker process from the next by (address, started): a container restarted
    at its old address within the same second must still get a fresh channel (not the dead one's
    reconnect backoff) and no ejection carried over. `started` is what workers write."""
    async def go(setup, fleet):
        failover, pool, workers, counters = await setup({"a": [ok(0, "a")] * 2, "b": [ok(0, "b")]})
        first = started_stamp()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", first), first
        at = dt.datetime.fromisoformat(first)
        second = at.replace(microsecond=(at.microsecond + 500_000) % 1_000_000).isoformat(timespec="microseconds")

        def restarted_a(started: str) -> dict[str, WorkerRecord]:
            return {"a": WorkerRecord("a", workers["a"].address, started=started),
                    "b": WorkerRecord("b", workers["b"].address)}

        fleet.close_later(pool.update(restarted_a(first)))
        old_channel = pool._channels["a"][1]
        for _ in range(3):
            pool.ejector.failure("a", "UNAVAILABLE")
        assert pool.ejector.is_ejected("a")

        stale = pool.update(restarted_a(second))
        fleet.close_later(stale)
        assert stale == [old_channel] and pool._channels["a"][1] is not old_channel
        assert not pool.ejector.is_ejected("a")
        assert (await failover.send(REQUEST, ("a", "b"), 1.0)).worker_id == "a"
    run(go)
