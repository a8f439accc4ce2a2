"""Predicts as frames on one stream per worker (router.worker_stream, worker.predict_stream):
what a frame keeps of a unary call, on scripted workers over real gRPC.

tests/test_failover_units.py runs the whole failover race over both transports; these cover
what only the stream has: many frames on one call, answers in the order they finish, a cancel
reaching the worker, batches that go as calls, older workers without PredictStream, a worker's
drain and a router's half-close.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from modelfleet.v1 import predictor_pb2
from router.counters import RouterCounters
from router.failover import Failover
from router.worker_stream import STREAM_MAX_FEATURES
from tests.scripted_worker import HANG, REQUEST, ScriptedFleet, ok
from version_service.schema import WorkerRecord


def run(test) -> None:
    async def main():
        async with ScriptedFleet("stream") as fleet:
            await test(fleet)
    asyncio.run(main())


async def eventually(condition, what: str, timeout: float = 2.0) -> None:
    """Polls `condition` until it holds or `timeout` passes (for state no scripted call announces)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def test_frames_share_one_stream_answer_as_they_finish_and_a_cancel_reaches_the_worker():
    async def go(fleet):
        pool, workers = await fleet.start({"a": [HANG, ok(0.0, "a")]})
        a = pool.predictors["a"]
        hung = a.Predict(REQUEST, timeout=5.0)
        await fleet.until(lambda: len(workers["a"].calls) == 1, "the first frame to reach a")
        answers = await asyncio.gather(*(asyncio.ensure_future(a.Predict(REQUEST, timeout=5.0)) for _ in range(5)))
        assert [r.worker_id for r in answers] == ["a"] * 5
        assert not hung.done()  # answered while the first frame still hangs: no head-of-line wait
        assert all(c.streamed for c in workers["a"].calls) and len(workers["a"].calls) == 6
        assert workers["a"].streams.open_streams == 1 and a.streaming
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        await fleet.until(lambda: workers["a"].calls[0].cancelled_early(), "the cancel frame to reach a")
    run(go)


def test_a_batch_too_big_for_a_frame_goes_as_a_call():
    async def go(fleet):
        pool, workers = await fleet.start({"a": [ok(0.0, "a")]})
        big = predictor_pb2.PredictRequest(tenant_id="acme", version="v1", features=[0.0] * (STREAM_MAX_FEATURES + 8))
        assert (await pool.predictors["a"].Predict(big, timeout=2.0)).worker_id == "a"
        assert (await pool.predictors["a"].Predict(REQUEST, timeout=2.0)).worker_id == "a"
        assert [c.streamed for c in workers["a"].calls] == [False, True]
    run(go)


def test_an_older_worker_without_streams_gets_the_frames_again_as_calls_then_only_calls():
    async def go(fleet):
        pool, workers = await fleet.start({"a": [ok(0.0, "a")]}, without_streams=("a",))
        a = pool.predictors["a"]
        answers = await asyncio.gather(*(asyncio.ensure_future(a.Predict(REQUEST, timeout=2.0)) for _ in range(3)))
        assert [r.worker_id for r in answers] == ["a"] * 3  # sent as frames; PredictStream was UNIMPLEMENTED
        assert (await a.Predict(REQUEST, timeout=2.0)).worker_id == "a"
        assert not a.streaming and a.without_streams
        assert [c.streamed for c in workers["a"].calls] == [False] * 4
    run(go)


def test_a_draining_worker_finishes_its_frames_in_flight_and_new_ones_fail_over_at_once():
    async def go(fleet):
        pool, workers = await fleet.start({"a": [ok(0.3, "a"), ok(0.0, "a")], "b": [ok(0.0, "b")]})
        counters = RouterCounters()
        failover = Failover(pool, 32, counters=counters)
        first = asyncio.ensure_future(failover.send(predictor_pb2.PredictRequest(tenant_id="acme", version="v1"),
                                                    ("a", "b"), 5.0))
        await fleet.until(lambda: len(workers["a"].calls) == 1, "the first frame to reach a")
        workers["a"].streams.drain()
        second = await failover.send(predictor_pb2.PredictRequest(tenant_id="acme", version="v1"), ("a", "b"), 5.0)
        assert second.worker_id == "b" and counters.retries == 1  # a answered UNAVAILABLE, at once
        assert len(workers["a"].calls) == 1  # the second frame never reached a's Predict
        assert (await first).worker_id == "a"  # the frame in flight finished
        await eventually(lambda: workers["a"].streams.open_streams == 0, "a to end the stream")
        await eventually(lambda: not pool.predictors["a"].streaming, "the router to see the stream end")
        assert all(n == 0 for n in pool.inflight.values())
    run(go)


def test_a_stream_broken_under_its_frames_fails_them_over_at_once():
    async def go(fleet):
        pool, workers = await fleet.start({"a": [HANG], "b": [ok(0.0, "b")]})
        failover = Failover(pool, 32)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = asyncio.ensure_future(failover.send(predictor_pb2.PredictRequest(tenant_id="acme", version="v1"),
                                                   ("a", "b"), 4.0))
        await fleet.until(lambda: len(workers["a"].calls) == 1, "the frame to reach a")
        await workers["a"].stop()  # a dies: its server cancels the stream
        assert (await sent).worker_id == "b"
        assert loop.time() - started < 1.5  # well before a's attempt timeout (2 s of the 4 s deadline)
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # a fresh stream to the dead worker fails
            await pool.predictors["a"].Predict(REQUEST, timeout=2.0)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    run(go)


def test_a_leaving_workers_stream_is_half_closed_so_its_frames_finish():
    async def go(fleet):
        pool, workers = await fleet.start({"a": [ok(0.2, "a")], "b": [ok(0.0, "b")]})
        a = pool.predictors["a"]
        in_flight = a.Predict(REQUEST, timeout=5.0)
        await fleet.until(lambda: len(workers["a"].calls) == 1, "the frame to reach a")
        fleet.close_later(pool.update({"b": WorkerRecord(worker_id="b", address=workers["b"].address)}))  # a left
        assert "a" not in pool.predictors
        assert (await in_flight).worker_id == "a"
        await eventually(lambda: workers["a"].streams.open_streams == 0, "a to end the half-closed stream")
    run(go)


def test_a_frame_nobody_waits_for_any_more_is_not_written():
    """Frames queued behind a stalled worker that expire or are cancelled meanwhile are dropped
    by the writer, so a worker that resumes (SIGCONT) does not start their loads."""
    async def go(fleet):
        pool, workers = await fleet.start({"a": [ok(0.0, "a")]})
        a = pool.predictors["a"]
        assert (await a.Predict(REQUEST, timeout=2.0)).worker_id == "a"  # the stream is open and ready
        given_up = a.Predict(REQUEST, timeout=2.0)
        given_up.cancel()  # before the writer ran: still in its queue
        assert (await a.Predict(REQUEST, timeout=2.0)).worker_id == "a"
        assert len(workers["a"].calls) == 2 and workers["a"].streams.frames_received == 2
    run(go)
