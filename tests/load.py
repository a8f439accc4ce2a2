"""Closed-loop load for fault tests: caller threads that record every outcome with its time.

Each caller sends its next request when the last one is answered. Outcomes are appended to
one list (list.append is atomic under the GIL) as (finished_at, ok, latency_s, detail) with
detail = the answering worker's id or the status code name, so a test can split them at the
moment a fault happened.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc
import numpy as np

from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc


@dataclass
class Outcome:
    at: float
    ok: bool
    latency: float
    detail: str  # worker id, or the status code name
    tenant: str = ""


@dataclass
class Load:
    address: str
    tenants: Sequence[str]
    features: Sequence[float]
    callers: int = 4
    timeout: float = 2.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(self.address)
        self._stub = predictor_pb2_grpc.PredictorStub(self._channel)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.callers)]

    def _run(self, index: int) -> None:
        tenants = itertools.cycle(self.tenants[index:] + self.tenants[:index])
        requests = {t: predictor_pb2.PredictRequest(tenant_id=t, features=list(self.features)) for t in self.tenants}
        while not self._stop.is_set():
            tenant = next(tenants)
            started = time.perf_counter()
            try:
                worker = self._stub.Predict(requests[tenant], timeout=self.timeout).worker_id
                self.outcomes.append(Outcome(time.monotonic(), True, time.perf_counter() - started, worker, tenant))
            except grpc.RpcError as exc:
                self.outcomes.append(Outcome(time.monotonic(), False, time.perf_counter() - started,
                                             f"{exc.code().name}: {exc.details()}", tenant))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self._channel.close()

    def count(self, since: float = 0.0, ok: bool | None = None) -> int:
        return sum(1 for o in list(self.outcomes) if o.at >= since and (ok is None or o.ok == ok))


def p99_ms(latencies: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(latencies), 99) * 1000)
