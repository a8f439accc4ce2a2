"""Scripted workers: real grpc.aio Worker servers whose Predict follows a script, for router unit tests.

router.failover's race (attempt timeouts, hedges, ejection, overload hints, cancellation) needs
worker behaviours that a real worker only shows by accident: answer after exactly 0.3 s, fail with
UNAVAILABLE, shed with RESOURCE_EXHAUSTED and a `retry-after-ms` trailer, hang until cancelled.
A ScriptedWorker is a real gRPC server on 127.0.0.1 (port 0) implementing the worker's Predict
service (modelfleet.v1.Worker; PredictStream runs the script per frame), and the router reaches
it through a real WorkerPool, channels and stubs; only the behaviour is scripted, so every behaviour is deterministic and every timing a
few tens of milliseconds. It runs in the test's own event loop, so it lives and dies with it.

Scripts, one per Predict call (the last repeats):

- ok(delay, worker_id): sleep `delay`, then answer PredictResponse(worker_id=...);
- err(delay, code, trailing): sleep `delay`, then abort with `code`, details "<CODE>!", and
  `trailing` as trailing metadata;
- HANG: never answer; wait until the call is cancelled (by the client, its deadline or its channel).

Each Predict is recorded server-side as a ServedCall: the metadata it arrived with and whether it
was cancelled before it finished. Cancellation reaches the server asynchronously, so tests wait
for it with `ScriptedFleet.until(condition)` (a deadline, no sleeps).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import grpc

from modelfleet.v1 import predictor_pb2, worker_pb2, worker_pb2_grpc
from router.ejection import OutlierEjector
from router.worker_pool import WorkerPool
from version_service.schema import WorkerRecord
from worker.predict_stream import FrameContext, PredictStreams

REQUEST = predictor_pb2.PredictRequest(tenant_id="acme", version="v1", features=[0.0] * 8)


def ok(delay: float, worker: str) -> tuple:
    return ("ok", delay, worker)


def err(delay: float, code: grpc.StatusCode, trailing=()) -> tuple:
    return ("err", delay, code, tuple(trailing))


HANG = ("hang", 0)


@dataclass
class ServedCall:
    """One Predict as the scripted worker saw it."""

    metadata: dict[str, str]
    streamed: bool = False  # arrived as a PredictStream frame, not as a unary call
    cancelled: bool = False  # the call went away (cancel, deadline, closed channel) before it finished
    left_s: float | None = None  # when cancelled: the seconds its deadline still had (~0: the deadline did it)
    finished: bool = False  # its handler is over: answered, aborted or cancelled

    def cancelled_early(self, margin_s: float = 0.05) -> bool:
        """Cancelled by the client (or its channel) while the call still had time, not by its deadline."""
        return self.cancelled and self.left_s is not None and self.left_s > margin_s


@dataclass
class _Changes:
    """Wakes whoever waits on a condition about the scripted workers, whenever a call arrives or ends."""

    waiters: list[asyncio.Future] = field(default_factory=list)

    def notify(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """One scripted worker: a grpc.aio server of modelfleet.v1.Worker on 127.0.0.1, port 0."""

    def __init__(self, worker_id: str, scripts: list[tuple], changes: _Changes, streams: bool = True) -> None:
        self.worker_id = worker_id
        self.scripts = scripts
        # PredictStream runs the scripted Predict per frame, as a real worker runs its own; without
        # it the worker answers PredictStream UNIMPLEMENTED, as one older than streams does
        self.streams = PredictStreams(self.Predict) if streams else None
        self.calls: list[ServedCall] = []
        self.address = ""
        self._changes = changes
        self._server: grpc.aio.Server | None = None

    async def start(self) -> str:
        self._server = grpc.aio.server()
        if self.streams is not None:
            worker_pb2_grpc.add_WorkerServicer_to_server(self.streams.serving(self), self._server)
        else:  # what a worker built before PredictStream serves: no such method at all
            unary = {name: grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=request.FromString, response_serializer=lambda r: r.SerializeToString())
                for name, method, request in (("Predict", self.Predict, predictor_pb2.PredictRequest),
                                              ("Stats", self.Stats, worker_pb2.StatsRequest))}
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("modelfleet.v1.Worker", unary),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        assert port, "cannot listen on 127.0.0.1"
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def Predict(self, request, context):
        call = ServedCall(metadata={k: v for k, v in context.invocation_metadata() or ()},
                          streamed=isinstance(context, FrameContext))
        script = self.scripts[min(len(self.calls), len(self.scripts) - 1)]
        self.calls.append(call)
        self._changes.notify()
        kind, delay, *rest = script
        try:
            if kind == "hang":
                await asyncio.get_running_loop().create_future()  # until cancelled
            await asyncio.sleep(delay)
            if kind == "ok":
                return predictor_pb2.PredictResponse(worker_id=rest[0])
            code, trailing = rest[0], rest[1] if len(rest) > 1 else ()
            context.set_trailing_metadata(trailing)
            await context.abort(code, f"{code.name}!")
        except asyncio.CancelledError:
            call.cancelled, call.left_s = True, context.time_remaining()
            raise
        finally:
            call.finished = True
            self._changes.notify()

    async def Stats(self, request, context):
        """Answered without a script: the fleet's readiness check, not part of any test's story."""
        return worker_pb2.StatsResponse(worker_id=self.worker_id)


class ScriptedFleet:
    """Scripted workers and the WorkerPools connected to them; `async with` closes them all.

    `start` builds the router's side the way the router does: WorkerPool.update with each worker's
    record opens a real channel and stub per worker. Each channel is connected (a Stats call) before
    the test starts, so timings measure the scripts, not TCP and HTTP/2 handshakes.
    """

    def __init__(self, transport: str = "stream") -> None:
        self.transport = transport  # how the pools' Predicts travel (router.worker_stream)
        self.workers: list[ScriptedWorker] = []
        self.pools: list[WorkerPool] = []
        self._channels: list[grpc.aio.Channel] = []
        self._changes = _Changes()

    async def __aenter__(self) -> "ScriptedFleet":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self, scripts: dict[str, list[tuple]], ejector: OutlierEjector | None = None,
                    without_streams: tuple[str, ...] = ()) -> tuple[WorkerPool, dict[str, ScriptedWorker]]:
        """`without_streams`: workers that answer PredictStream UNIMPLEMENTED (older ones)."""
        workers = {w: ScriptedWorker(w, s, self._changes, streams=w not in without_streams)
                   for w, s in scripts.items()}
        self.workers.extend(workers.values())
        records = {w: WorkerRecord(worker_id=w, address=await worker.start()) for w, worker in workers.items()}
        pool = WorkerPool(ejector, transport=self.transport)
        self.pools.append(pool)
        self.close_later(pool.update(records))
        for worker_id in workers:
            assert (await pool.stubs[worker_id].Stats(worker_pb2.StatsRequest(), timeout=5)).worker_id == worker_id
        return pool, workers

    def close_later(self, channels: list[grpc.aio.Channel]) -> None:
        """Channels a pool handed back (departed workers) that the caller must close: at the end."""
        self._channels.extend(channels)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
        """Returns once `condition()` holds (re-checked whenever a scripted call arrives or ends)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            waiter = loop.create_future()
            self._changes.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()
        for channel in self._channels:
            await channel.close()
        for worker in self.workers:
            await worker.stop()
        self.pools.clear()
        self._channels.clear()
        self.workers.clear()
