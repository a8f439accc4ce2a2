"""The worker's end of PredictStream: many Predicts as frames on one long-lived call, each run
by the same handler a unary Predict runs (metrics, tracing, validation, cache), with a context
of its own.

Why: grpc.aio's CPU cost is per message, ~190 µs less for a message on an open stream than for
a unary call (client and server together; `python -m loadtest.bench_transport`, 2 cores), and on
a small box that hop, not anyone's logic, is what a router costs. The router keeps one stream per
worker (router.worker_stream); this end writes every outcome that is ready as one message, up to
MAX_BATCH_VALUES predictions.

What a unary call gives a Predict, a frame keeps:
- its deadline: `timeout_ms`, which `time_remaining()` counts down; the router cancels the frame
  when it passes;
- cancellation: a `cancel` frame cancels that frame's task (a hedge's loser stops waiting for its
  load), and the stream ending (the router gone) cancels every frame on it; neither sends an outcome;
- its status: the handler's abort code, message and trailing metadata (retry-after-ms) travel in
  the outcome;
- independence: each frame runs as its own task and its outcome goes out when it finishes, so a
  cold load never holds up a warm tenant's frame behind it;
- drain: once the worker is leaving (`drain()`), frames still arriving are answered UNAVAILABLE at
  once (the router fails over, as it would from a stopping server), frames in flight finish, and
  each stream ends when its last frame is answered.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import grpc

from modelfleet.log import event
from modelfleet.servicer_wrap import ServicerStandIn, UnaryMethod
from modelfleet.v1 import worker_pb2

log = logging.getLogger("modelfleet.worker")

STREAM_READY = ("modelfleet-stream", "ready")  # initial metadata: the router starts writing when it sees it
MAX_BATCH_VALUES = 1 << 20  # predictions per outcomes message (8 MiB of doubles, within any message limit)
_READ_DONE = object()  # the router half-closed (or the read failed): no more frames
_DRAIN = object()  # the worker is leaving: end once the frames in flight are answered
_CANCELLED_ONE = object()  # a frame was cancelled: it sends no outcome, so look again at what is left
_CANCELLED = grpc.StatusCode.CANCELLED


class FrameContext:
    """What Predict's handlers use of grpc.aio.ServicerContext, for one frame."""

    __slots__ = ("_metadata", "_deadline", "_loop", "_code", "_details", "_trailing")

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._loop = loop
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def outcome(self, frame_id: int) -> worker_pb2.PredictOutcome:
        """The outcome of the frame whose handler aborted: its code, message and trailers."""
        return _failed(frame_id, self._code or grpc.StatusCode.UNKNOWN, self._details, dict(self._trailing))

    def cancel(self, task: asyncio.Task) -> None:
        """Cancels the frame's `task`, so that what counts its calls (metrics) sees CANCELLED."""
        self._code = _CANCELLED
        task.cancel()


def _failed(frame_id: int, code: grpc.StatusCode, details: str,
            trailing: dict | None = None) -> worker_pb2.PredictOutcome:
    return worker_pb2.PredictOutcome(id=frame_id, code=code.value[0], details=details, trailing_metadata=trailing)


class PredictStreams:
    """Serves PredictStream over a unary Predict handler: the one a unary call runs, wrappers and all."""

    def __init__(self, predict: UnaryMethod) -> None:
        self._predict = predict
        self._draining = False
        self._open: set[asyncio.Queue] = set()  # each open stream's outcome queue
        self.frames_received = 0  # Predict frames read, cancels not counted

    def serving(self, servicer: Any) -> ServicerStandIn:
        """What to register in place of `servicer`: the same, with PredictStream served here."""
        return ServicerStandIn(servicer, {"PredictStream": self.serve})

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def drain(self) -> None:
        """The worker is leaving: answer new frames UNAVAILABLE, end each stream once its frames
        in flight are answered."""
        self._draining = True
        for outcomes in self._open:
            outcomes.put_nowait(_DRAIN)

    async def serve(self, batches: AsyncIterator[worker_pb2.PredictFrames], context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        predict = self._predict
        outcomes: asyncio.Queue = asyncio.Queue()
        running: dict[int, tuple[asyncio.Task, FrameContext]] = {}

        async def run(frame_id: int, request, frame_context: FrameContext) -> None:
            try:
                response = await predict(request, frame_context)
            except asyncio.CancelledError:
                return  # cancelled by the router or by the stream's end: nobody waits for an outcome
            except grpc.aio.AbortError:
                outcome = frame_context.outcome(frame_id)
            except Exception as exc:  # noqa: BLE001 - a handler without translate_errors: never kill the stream
                event(log, "worker.stream_frame_error", level=logging.ERROR, error=repr(exc))
                outcome = _failed(frame_id, grpc.StatusCode.INTERNAL, "internal error in Predict (logged)")
            else:
                outcome = worker_pb2.PredictOutcome(id=frame_id, response=response)
            finally:
                running.pop(frame_id, None)
            outcomes.put_nowait(outcome)

        async def read() -> None:
            try:
                async for batch in batches:
                    for frame in batch.frames:
                        receive(frame)
            finally:
                outcomes.put_nowait(_READ_DONE)

        def receive(frame: worker_pb2.PredictFrame) -> None:
            frame_id = frame.id
            if frame.cancel:
                entry = running.pop(frame_id, None)
                if entry is not None:
                    entry[1].cancel(entry[0])
                    outcomes.put_nowait(_CANCELLED_ONE)
                return
            self.frames_received += 1
            if self._draining:
                outcomes.put_nowait(_failed(frame_id, grpc.StatusCode.UNAVAILABLE, "worker is leaving the fleet"))
            elif frame_id in running:
                outcomes.put_nowait(_failed(frame_id, grpc.StatusCode.INVALID_ARGUMENT,
                                            f"frame id {frame_id} is already in flight on this stream"))
            else:
                timeout_ms = frame.timeout_ms
                frame_context = FrameContext(tuple(frame.metadata.items()),
                                             loop.time() + timeout_ms / 1000 if timeout_ms > 0 else None, loop)
                running[frame_id] = (loop.create_task(run(frame_id, frame.request, frame_context)),
                                     frame_context)

        await context.send_initial_metadata((STREAM_READY,))
        self._open.add(outcomes)
        reader = loop.create_task(read())
        reading = not self._draining
        try:
            while reading or running or outcomes.qsize():
                ready, values = [await outcomes.get()], 0
                while outcomes.qsize() and values < MAX_BATCH_VALUES:
                    ready.append(outcome := outcomes.get_nowait())
                    if type(outcome) is worker_pb2.PredictOutcome:
                        values += len(outcome.response.predictions)
                batch = []
                for outcome in ready:
                    if outcome is _READ_DONE or outcome is _DRAIN:
                        reading = False
                    elif outcome is not _CANCELLED_ONE:
                        batch.append(outcome)
                if batch:
                    await context.write(worker_pb2.PredictOutcomes(outcomes=batch))
        finally:
            self._open.discard(outcomes)
            reader.cancel()
            for task, frame_context in list(running.values()):  # the router is gone: stop its work
                frame_context.cancel(task)
            running.clear()
