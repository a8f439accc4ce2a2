"""What one gRPC message costs in grpc.aio: a unary call against a message on a long-lived
bidirectional stream, side by side, client and server CPU per message.

    python -m loadtest.bench_transport [--seconds 4] [--concurrency 8] [--rounds 2]

On a 2-core box the router -> worker hop, not the router's own logic, is what a router costs
(see loadtest.bench's CPU µs/req columns); this measures what each wire design costs there. A
server in its own process echoes 120-byte messages (a single-row Predict's size) through a
generic handler (no protobuf), as `unary_unary` with
`--concurrency` callers, as the same with one 64-character metadata entry that the server
reads (what the artifact hint cost while it travelled as metadata: worker.artifact_hint), as
one `stream_stream` call with that many messages in flight, and as that stream with every
payload that is ready written as one message (what router.worker_stream and
worker.predict_stream do with frames; the echo answers a message of k payloads with one).
Rounds alternate the four so that a noisy machine hurts them alike. Loopback only; ~40 s.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time

import grpc

from modelfleet import processes
from modelfleet.procfs import cpu_seconds

PAYLOAD = b"x" * 120
SERVICE = "loadtest.Echo"


async def _unary(request: bytes, context) -> bytes:
    return request


async def _unary_reading_metadata(request: bytes, context) -> bytes:
    dict(context.invocation_metadata() or ())
    return request


async def _stream(requests, context):
    async for message in requests:
        yield message


async def serve(port_file: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "UnaryMetadata": grpc.unary_unary_rpc_method_handler(_unary_reading_metadata),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    await server.wait_for_termination()


async def _measure(channel: grpc.aio.Channel, mode: str, seconds: float, concurrency: int,
                   server_pid: int) -> tuple[float, float, float]:
    """(messages/s, client µs/message, server µs/message) after a 0.5 s warm-up."""
    done = 0
    if mode.startswith("unary"):
        call = channel.unary_unary(f"/{SERVICE}/Unary" if mode == "unary" else f"/{SERVICE}/UnaryMetadata")
        metadata = (("x-modelfleet-artifact", "0" * 64),) if mode == "unary+md" else None

        async def caller(until: float) -> None:
            nonlocal done
            while time.monotonic() < until:
                await call(PAYLOAD, timeout=10, metadata=metadata)
                done += 1

        await asyncio.gather(*(caller(time.monotonic() + 0.5) for _ in range(concurrency)))
        done, started = 0, time.monotonic()
        before = cpu_seconds(["self"]), cpu_seconds([server_pid])
        await asyncio.gather(*(caller(started + seconds) for _ in range(concurrency)))
    else:  # callers await futures that one reader resolves, as router.worker_stream's callers do
        stream = channel.stream_stream(f"/{SERVICE}/Stream")()
        ready: asyncio.Queue = asyncio.Queue()
        waiting: collections.deque = collections.deque()  # the echo keeps the order: first in, first out
        batched = mode == "stream+batch"

        async def writer() -> None:
            while True:
                payloads = [await ready.get()]
                while batched and ready.qsize():
                    payloads.append(ready.get_nowait())
                await stream.write(b"".join(payloads))

        async def reader() -> None:
            while (message := await stream.read()) is not grpc.aio.EOF:
                for _ in range(len(message) // len(PAYLOAD)):
                    waiting.popleft().set_result(None)

        async def caller(until: float) -> None:
            nonlocal done
            loop = asyncio.get_running_loop()
            while time.monotonic() < until:
                waiting.append(answered := loop.create_future())
                ready.put_nowait(PAYLOAD)
                await answered
                done += 1

        tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
        await asyncio.gather(*(caller(time.monotonic() + 0.5) for _ in range(concurrency)))
        done, started = 0, time.monotonic()
        before = cpu_seconds(["self"]), cpu_seconds([server_pid])
        await asyncio.gather(*(caller(started + seconds) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    n = max(1, done)
    client_cpu, server_cpu = cpu_seconds(["self"]) - before[0], cpu_seconds([server_pid]) - before[1]
    if mode.startswith("stream"):
        stream.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return n / elapsed, 1e6 * client_cpu / n, 1e6 * server_cpu / n


async def _run(args: argparse.Namespace, port: int, server_pid: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for r in range(args.rounds):
            for mode in ("unary", "unary+md", "stream", "stream+batch"):
                rate, client_us, server_us = await _measure(channel, mode, args.seconds, args.concurrency, server_pid)
                print(f"round {r + 1}  {mode:<12} {rate:>8,.0f} msg/s   client {client_us:>5.0f} µs/msg   "
                      f"server {server_us:>5.0f} µs/msg", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the echo server, write its port here
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    print(f"os.cpu_count()={os.cpu_count()}, grpcio {grpc.__version__}, {len(PAYLOAD)}-byte messages, "
          f"{args.concurrency} in flight")
    with tempfile.TemporaryDirectory(prefix="modelfleet-bench-transport-") as tmp:
        port_file = os.path.join(tmp, "port")
        server = processes.spawn([sys.executable, "-m", "loadtest.bench_transport", "--serve", port_file])
        try:
            processes.wait_for(lambda: os.path.exists(port_file), timeout=30, what="echo server port")
            with open(port_file) as f:
                port = int(f.read())
            asyncio.run(_run(args, port, server.pid))
        finally:
            processes.stop(server)


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    main()
