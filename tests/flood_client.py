"""A tenant flooding at a fixed rate, open loop, in its own process (so its CPU and GIL stay out
of the measuring test's latencies), and a sink to aim the same flood at for comparison.

    python -m tests.flood_client flood TENANT RPS ROWS
        prints `ready`, then reads commands from stdin: `flood SECONDS ADDRESS` floods ADDRESS for
        that long and prints one JSON line (sent, seconds, status name -> count, how many
        RESOURCE_EXHAUSTED carried `retry-after-ms`, the smallest and largest hint); end of
        input quits.
    python -m tests.flood_client sink PORT
        a Predictor that refuses everything at once with RESOURCE_EXHAUSTED + `retry-after-ms`
        (what the router answers a tenant over its quota), so a test can tell what a flood costs
        the machine from what it costs the router.
"""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter

import grpc

from modelfleet.demo_models import sample_features
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc
from worker.overload import RETRY_AFTER_KEY, retry_hint


def flood(stub, request, rps: float, seconds: float) -> dict:
    codes: Counter = Counter()
    hints: list[int] = []
    lock = threading.Lock()
    pending = [0]
    done = threading.Condition(lock)

    def finished(future) -> None:
        code = future.code()
        hint = retry_hint(future.trailing_metadata()) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        with lock:
            codes[code.name] += 1
            if hint is not None:
                hints.append(hint)
            pending[0] -= 1
            done.notify_all()

    interval = 1.0 / rps
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - start < seconds:
        due = start + sent * interval
        if now < due:
            time.sleep(due - now)  # pacing the open loop
            continue
        with lock:
            pending[0] += 1
        stub.Predict.future(request, timeout=5).add_done_callback(finished)
        sent += 1
    elapsed = time.monotonic() - start
    with lock:
        done.wait_for(lambda: pending[0] == 0, timeout=30)
    return {"sent": sent, "seconds": elapsed, "codes": dict(codes), "with_hint": len(hints),
            "hint_min": min(hints, default=0), "hint_max": max(hints, default=0)}


def run_flooder(tenant: str, rps: float, rows: int) -> None:
    request = predictor_pb2.PredictRequest(tenant_id=tenant, features=sample_features(9, rows).reshape(-1))
    channels: dict[str, grpc.Channel] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "flood":
            seconds, address = float(args[0]), args[1]
            if address not in channels:
                channels[address] = grpc.insecure_channel(address)
                try:
                    predictor_pb2_grpc.PredictorStub(channels[address]).Predict(request, timeout=10)
                except grpc.RpcError:
                    pass  # any answer: connected
            stub = predictor_pb2_grpc.PredictorStub(channels[address])
            print(json.dumps(flood(stub, request, rps, seconds)), flush=True)
    for channel in channels.values():
        channel.close()


class _Sink(predictor_pb2_grpc.PredictorServicer):
    async def Predict(self, request, context):
        context.set_trailing_metadata(((RETRY_AFTER_KEY, "50"),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "sink: refused; retry after 50 ms")


async def run_sink(port: int) -> None:
    server = grpc.aio.server()
    predictor_pb2_grpc.add_PredictorServicer_to_server(_Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        asyncio.run(run_sink(int(sys.argv[2])))
    else:
        run_flooder(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
