"""A router's Predicts to one worker as frames on one long-lived PredictStream (worker.predict_stream).

Why: grpc.aio's CPU cost is per message: ~190 µs less for a message on an open stream than
for a unary call (router and worker together), and a message of several frames costs little more
than a message of one (`python -m loadtest.bench_transport`), so the writer here puts every frame
that is ready into one. That hop is most of what routing costs on a small box: on 2 cores the
worker spends ~150–200 µs less CPU per request and the router ~50–100 µs less (`python -m
loadtest.bench`, `MODELFLEET_WORKER_TRANSPORT=stream` against `unary`). Under a steady load
frames arrive one per event-loop turn, so messages carry 1.04–1.3 frames on average; batching
pays in bursts. A frame is never held back to make batches larger: holding each one while 4 or
more earlier frames were unanswered, until an answer came or 2 ms passed (2.3 frames a message;
uvloop's timers tick in whole milliseconds), raised 2-core throughput with 32 callers by 11–26 %
but raised p99 in each of those cells (+3 to +46 %) and did not help with 8 callers (two runs each).

`WorkerPredict.Predict(request, timeout, metadata)` returns what router.failover races: a
unary call, or a `StreamedCall` that behaves as one: awaitable (the response, an AioRpcError
with the worker's status, message and trailing metadata, or CancelledError once cancelled),
`done()`, `cancel()` (which tells the worker to stop, as cancelling a call does) and
`add_done_callback()`; its deadline is `timeout`, as a call's is. So failover, hedging,
ejection and their books work the same on either.

What goes unary instead:
- batches of more than STREAM_MAX_FEATURES feature values: frames on one stream go out one after
  another, so a large one would delay every small one behind it, and a large call's fixed cost is
  small next to its own;
- everything, for UNARY_RETRY_S, to a worker that answers PredictStream UNIMPLEMENTED (an older
  worker in a rolling upgrade); the frames in flight when it says so are sent again as calls;
- everything, with `--worker-transport unary`.

The stream opens on the first Predict and again on the first after it ends. When it ends (the
worker stopped, a broken connection), frames in flight fail UNAVAILABLE and failover sends them
to the next member; when the channel closes under it (the worker left the fleet, the router
stops), they are cancelled, as calls on a closing channel are. `close()` half-closes the stream
when a worker leaves: the worker answers what is in flight, then ends it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from modelfleet.config import worker_transport
from modelfleet.log import event
from modelfleet.v1 import predictor_pb2, worker_pb2, worker_pb2_grpc
from worker.predict_stream import MAX_BATCH_VALUES, STREAM_READY

log = logging.getLogger("modelfleet.router")

STREAM_MAX_FEATURES = 8192  # 64 KiB of doubles: larger batches go as unary calls
UNARY_RETRY_S = 60.0  # how long a worker without PredictStream gets unary calls before the next try

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_NO_METADATA = grpc.aio.Metadata()


def _rpc_error(code: grpc.StatusCode, details: str, trailing: Any = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, _NO_METADATA, grpc.aio.Metadata(*trailing) if trailing else _NO_METADATA,
                                details)


class StreamedCall:
    """One Predict sent as a frame; see the module docstring for how it stands in for a call."""

    __slots__ = ("_future", "_stream", "_id", "_timer", "_request", "_metadata", "_relay")

    def __init__(self, future: asyncio.Future, stream: "_Stream", frame_id: int, request, metadata) -> None:
        self._future = future
        self._stream = stream
        self._id = frame_id
        self._timer: asyncio.TimerHandle | None = None
        self._request, self._metadata = request, metadata  # to resend as a call
        self._relay: asyncio.Task | None = None  # the unary call this frame became, if it did

    def __await__(self):
        return self._future.__await__()

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback) -> None:
        """`callback` gets the underlying future, not this object (failover's wake-up ignores it)."""
        self._future.add_done_callback(callback)

    def cancel(self) -> bool:
        """Also when the future is cancelled already (a task awaiting it was): the worker must hear."""
        self._abandon()
        return self._future.cancel()

    def _expire(self) -> None:  # its deadline: the worker is told to stop, the caller gets DEADLINE_EXCEEDED
        self._timer = None
        if not self._future.done():
            self._abandon()
            self._future.set_exception(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _abandon(self) -> None:
        """Nobody waits for this Predict any more: the worker is told to stop on it."""
        self._stream.forget(self, cancel=True)
        if self._relay is not None:
            self._relay.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Stream:
    """One PredictStream call and its frames in flight."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, owner: "WorkerPredict",
                 loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.owner = owner
        self.pending: dict[int, StreamedCall] = {}
        self.open = True
        self._queue: asyncio.Queue = asyncio.Queue()  # frames to write; None half-closes
        self._next_id = 0
        self._call = stub.PredictStream()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    def send(self, request: predictor_pb2.PredictRequest, timeout: float, metadata) -> StreamedCall:
        self._next_id += 1
        frame_id = self._next_id
        frame = worker_pb2.PredictFrame(id=frame_id, request=request, timeout_ms=timeout * 1000)
        if metadata:
            frame.metadata.update(metadata)
        call = StreamedCall(self.loop.create_future(), self, frame_id, request, metadata)
        call._timer = self.loop.call_later(timeout, call._expire)
        self.pending[frame_id] = call
        self._queue.put_nowait(frame)
        return call

    def forget(self, call: StreamedCall, cancel: bool) -> None:
        """`call` is over on the router's side; with `cancel`, the worker is told to stop on it."""
        if self.pending.pop(call._id, None) is not None and cancel and self.open:
            self._queue.put_nowait(worker_pb2.PredictFrame(id=call._id, cancel=True))
        call._stop_timer()

    def half_close(self) -> None:
        self._queue.put_nowait(None)

    async def _write(self) -> None:
        """Writes frames in order, once the worker has accepted the stream.

        grpc.aio ends a call with INTERNAL when a write fails because the other side has ended it
        already, and that would hide why it ended: an older worker's UNIMPLEMENTED. So the writer
        waits for the worker's STREAM_READY initial metadata (sent as it starts serving the
        stream; one round trip per stream, not per frame) before it writes; frames queue meanwhile.
        Initial metadata without it is the end of a call that never started (UNIMPLEMENTED comes
        as trailers only)."""
        queue, call, pending = self._queue, self._call, self.pending
        try:
            if STREAM_READY not in tuple(await call.initial_metadata()):
                await call.code()  # the reader settles the frames by how it ended
            else:
                while not call.done() and (frame := await queue.get()) is not None:
                    ready, values = [], 0
                    while True:
                        # A frame nobody waits for any more (its deadline passed, or it was cancelled,
                        # while it queued behind a stalled worker) is not sent: after a SIGSTOP's
                        # SIGCONT the worker would otherwise start every expired frame's load.
                        if frame.cancel or frame.id in pending:
                            ready.append(frame)
                            values += len(frame.request.features)
                        if not queue.qsize() or values >= MAX_BATCH_VALUES:
                            break
                        if (frame := queue.get_nowait()) is None:
                            queue.put_nowait(None)  # half-close after this batch
                            break
                    if ready:
                        await call.write(worker_pb2.PredictFrames(frames=ready))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call is over; the reader learns why and settles the frames in flight
        except Exception as exc:  # noqa: BLE001 - a frame that cannot be written: end the stream, not hang it
            event(log, "router.stream_write_failed", level=logging.ERROR, error=repr(exc))
            call.cancel()

    async def _read(self) -> None:
        pending = self.pending
        ended: grpc.aio.AioRpcError | None = None
        try:
            async for batch in self._call:
                for outcome in batch.outcomes:
                    call = pending.pop(outcome.id, None)
                    if call is None:
                        continue  # cancelled or past its deadline meanwhile
                    call._stop_timer()
                    if call._future.done():
                        continue  # the task awaiting it was cancelled (its canceller sends the cancel frame)
                    if outcome.code == 0:
                        call._future.set_result(outcome.response)
                    else:
                        code = _CODES.get(outcome.code, grpc.StatusCode.UNKNOWN)
                        call._future.set_exception(_rpc_error(code, outcome.details,
                                                              outcome.trailing_metadata.items()))
        except grpc.aio.AioRpcError as exc:
            ended = exc
        except asyncio.CancelledError:
            ended = _rpc_error(grpc.StatusCode.CANCELLED, "router stopped")
        finally:
            self.open = False
            self._queue.put_nowait(None)  # the writer may wait for a frame that will never come
            self._settle_pending(ended)

    def _settle_pending(self, ended: grpc.aio.AioRpcError | None) -> None:
        """The stream is over: what happens to the frames still waiting on it."""
        calls = list(self.pending.values())
        self.pending.clear()
        if ended is not None and ended.code() == grpc.StatusCode.UNIMPLEMENTED:
            self.owner.stream_unsupported(self.loop.time())
            for call in calls:  # an older worker: the same request as a unary call, in its remaining time
                if call._timer is not None and not call._future.done():
                    call._relay = self.loop.create_task(_relay(
                        self.owner.unary(call._request, call._timer.when() - self.loop.time(), call._metadata),
                        call._future))
            return
        for call in calls:
            call._stop_timer()
            if call._future.done():
                continue
            if ended is not None and ended.code() == grpc.StatusCode.CANCELLED:
                call._future.cancel()  # the channel closed under it: as a unary call on it would be
            else:
                why = "the worker ended the stream" if ended is None else f"{ended.code().name}: {ended.details()}"
                call._future.set_exception(_rpc_error(grpc.StatusCode.UNAVAILABLE,
                                                      f"predict stream to the worker ended ({why})"))


async def _relay(call: grpc.aio.UnaryUnaryCall, future: asyncio.Future) -> None:
    """Copies a unary call's outcome onto a frame's future (a frame resent as a call)."""
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        if not future.done():
            future.set_exception(exc)
    except asyncio.CancelledError:
        call.cancel()
        if not future.done():
            future.cancel()
    else:
        if not future.done():
            future.set_result(response)


class WorkerPredict:
    """Predict to one worker over its channel: frames on a stream, or unary calls."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, transport: str = "stream") -> None:
        self._stub = stub
        self._streaming = worker_transport(transport) == "stream"
        self._stream: _Stream | None = None
        self._unary_until = 0.0

    def Predict(self, request: predictor_pb2.PredictRequest, timeout: float, metadata=None):
        """A unary call or a StreamedCall; either way, race it as a call."""
        if not self._streaming or len(request.features) > STREAM_MAX_FEATURES:
            return self.unary(request, timeout, metadata)
        stream = self._stream
        if stream is None or not stream.open:
            loop = asyncio.get_running_loop()
            if self._unary_until:
                if loop.time() < self._unary_until:
                    return self.unary(request, timeout, metadata)
                self._unary_until = 0.0  # time to ask again: perhaps it was upgraded
            stream = self._stream = _Stream(self._stub, self, loop)
        return stream.send(request, timeout, metadata)

    def unary(self, request: predictor_pb2.PredictRequest, timeout: float, metadata) -> grpc.aio.UnaryUnaryCall:
        return self._stub.Predict(request, timeout=max(0.0, timeout), metadata=metadata)

    def stream_unsupported(self, now: float) -> None:
        self._unary_until = now + UNARY_RETRY_S

    @property
    def streaming(self) -> bool:
        """Whether a stream is open to this worker now."""
        return self._stream is not None and self._stream.open

    @property
    def without_streams(self) -> bool:
        """Whether this worker gets unary calls because it answered PredictStream UNIMPLEMENTED."""
        return self._unary_until > 0.0

    def close(self) -> None:
        """The worker left: no more frames; it answers those in flight, then ends the stream."""
        self._streaming = False
        if self._stream is not None and self._stream.open:
            self._stream.half_close()
