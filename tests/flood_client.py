"""A tenant flooding at a fixed rate, open loop, in its own process (so its CPU and GIL stay out
of the measuring test's latencies), and a sink to aim the same flood at for comparison.

    python -m tests.flood_client flood TENANT RPS ROWS
        prints `ready`, then reads commands from stdin; end of input quits.
        `flood SECONDS ADDRESS` floods ADDRESS for that long and prints one JSON line (sent,
        seconds, status name -> count, how many RESOURCE_EXHAUSTED carried `retry-after-ms`, the
        smallest and largest hint).
        `cycle SECONDS PERIOD ADDRESS...` floods the addresses in turn, PERIOD seconds each, then
        pauses for a PERIOD (phase k of the cycle: ADDRESS[k], or none when k == len), and prints
        one JSON line: {"start": its time.monotonic() at phase 0, "period", "results": one per
        address, as for `flood`}. The monotonic clock is the machine's, so a test can tell which
        phase any moment fell in.
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


class _Tally:
    def __init__(self) -> None:
        self.codes: Counter = Counter()
        self.hints: list[int] = []
        self.sent = 0
        self.seconds = 0.0

    def result(self) -> dict:
        return {"sent": self.sent, "seconds": self.seconds, "codes": dict(self.codes), "with_hint": len(self.hints),
                "hint_min": min(self.hints, default=0), "hint_max": max(self.hints, default=0)}


def flood(stubs: list, request, rps: float, seconds: float, period: float | None = None) -> tuple[float, list[dict]]:
    """Open-loop requests at `rps`; with `period`, cycling over stubs and a pause (see above)."""
    tallies = [_Tally() for _ in stubs]
    lock = threading.Lock()
    pending = [0]
    done = threading.Condition(lock)

    def finished(tally: _Tally, future) -> None:
        code = future.code()
        hint = retry_hint(future.trailing_metadata()) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        with lock:
            tally.codes[code.name] += 1
            if hint is not None:
                tally.hints.append(hint)
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
        sent += 1
        phase = 0 if period is None else int((now - start) / period) % (len(stubs) + 1)
        if phase == len(stubs):
            continue  # the pause
        tally = tallies[phase]
        tally.sent += 1
        tally.seconds += interval
        with lock:
            pending[0] += 1
        stubs[phase].Predict.future(request, timeout=5).add_done_callback(
            lambda future, tally=tally: finished(tally, future))
    with lock:
        done.wait_for(lambda: pending[0] == 0, timeout=30)
    return start, [t.result() for t in tallies]


def run_flooder(tenant: str, rps: float, rows: int) -> None:
    request = predictor_pb2.PredictRequest(tenant_id=tenant, features=sample_features(9, rows).reshape(-1))
    channels: dict[str, grpc.Channel] = {}
    print("ready", flush=True)
    def stub(address: str):
        if address not in channels:
            channels[address] = grpc.insecure_channel(address)
            try:
                predictor_pb2_grpc.PredictorStub(channels[address]).Predict(request, timeout=10)
            except grpc.RpcError:
                pass  # any answer: connected
        return predictor_pb2_grpc.PredictorStub(channels[address])

    for line in sys.stdin:
        command, *args = line.split()
        if command == "flood":
            _, results = flood([stub(args[1])], request, rps, float(args[0]))
            print(json.dumps(results[0]), flush=True)
        elif command == "cycle":
            stubs = [stub(a) for a in args[2:]]
            start, results = flood(stubs, request, rps, float(args[0]), period=float(args[1]))
            print(json.dumps({"start": start, "period": float(args[1]), "results": results}), flush=True)
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
