"""A bare pass-through gRPC proxy: the floor for any Python router hop on this gRPC stack.

It forwards `/modelfleet.v1.Predictor/Predict` to ONE worker: no routing, no validation, no
retries. The caller must set `version` itself (the worker requires it). Status codes and details
from the worker are passed back as they are. How it reaches the worker follows the router's
`--worker-transport` (MODELFLEET_WORKER_TRANSPORT), so both hops use the same wire:

- `stream`: each request, parsed, as a frame on one PredictStream, through the router's own
  router.worker_stream (the multiplexing is the wire, not routing logic);
- `unary`: the raw request bytes to `/modelfleet.v1.Worker/Predict` and the raw response bytes
  back, with no protobuf parsing at all.

Same stack as the router: grpc.aio on the same event loop (`--event-loop`,
MODELFLEET_EVENT_LOOP), the same server and channel options (`modelfleet.rpc`), one persistent
HTTP/2 channel to the worker. So `router - bare_proxy` in `loadtest.bench` is what the router's
own work costs (parse, route, shard, choose, re-serialise), and `bare_proxy - direct` is what
one extra Python gRPC hop costs at all.

    python -m loadtest.bare_proxy --port 50070 --worker 127.0.0.1:50061

Serves grpc.health.v1 too (SERVING once listening), so starters can wait for it.
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelfleet import allocator, config, event_loop
from modelfleet.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS
from modelfleet.v1 import predictor_pb2, worker_pb2_grpc
from router.worker_stream import WorkerPredict

PUBLIC_METHOD = "/modelfleet.v1.Predictor/Predict"
WORKER_METHOD = "/modelfleet.v1.Worker/Predict"


class ForwardHandler(grpc.GenericRpcHandler):
    """Answers PUBLIC_METHOD by forwarding it to the worker; nothing else."""

    def __init__(self, channel: grpc.aio.Channel, transport: str = "stream", default_timeout: float = 5.0) -> None:
        self._default_timeout = default_timeout
        if transport == "stream":
            self._send = WorkerPredict(worker_pb2_grpc.WorkerStub(channel), transport).Predict
            self._handler = grpc.unary_unary_rpc_method_handler(
                self._forward, request_deserializer=predictor_pb2.PredictRequest.FromString,
                response_serializer=predictor_pb2.PredictResponse.SerializeToString)
        else:  # no serializer / deserializer: the multicallable takes and returns bytes
            self._send = channel.unary_unary(WORKER_METHOD)
            self._handler = grpc.unary_unary_rpc_method_handler(self._forward)

    def service(self, handler_call_details):
        return self._handler if handler_call_details.method == PUBLIC_METHOD else None

    async def _forward(self, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        try:
            return await self._send(request, timeout=remaining if remaining is not None else self._default_timeout)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or exc.code().name)


async def serve(host: str, port: int, worker: str, transport: str) -> None:
    channel = grpc.aio.insecure_channel(worker, options=CHANNEL_OPTIONS)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((ForwardHandler(channel, transport),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"bare_proxy listening on {host}:{bound} -> {worker} ({transport})", flush=True)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    await server.stop(grace=2)
    await channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker", required=True, help="HOST:PORT of the one worker to forward to")
    # the router's loop, malloc and wire to the workers, so the floor is the same stack
    config.add_options(parser, config.EVENT_LOOP, config.ALLOCATOR, config.WORKER_TRANSPORT)
    args = parser.parse_args(argv)
    allocator.ensure(args.allocator)
    event_loop.run(serve(args.host, args.port, args.worker, args.worker_transport), args.event_loop)


if __name__ == "__main__":
    main()
