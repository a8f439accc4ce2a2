"""Load shedding on real processes.

- A tenant flooding at 10x its quota (set in etcd with Registry.set_limits) gets RESOURCE_EXHAUSTED
  with `retry-after-ms` for the excess, refused at the router before any worker sees it; the
  other tenants keep >= 99.9 % success and their p99 rises <= 20 % over the same flood aimed at a
  sink process (see `_flood_and_compare` for why the sink is the baseline on a small machine,
  and why "rises" is judged with a confidence bound; the rise over quiet windows is printed too).
  A refusal is still a gRPC call: ~440 µs of router CPU on this 2-core machine, of which ~370 µs
  is Python gRPC's own per-call floor (a sink that only refuses costs that much) and ~70 µs the
  router's checks; for that long the router's event loop serves nobody else. The flood is sized
  to the machine: 10 x a 5 rps quota = 50 rps keeps the router ~2 % busy with it (at 100 rps the
  router measured +18..20 % over the sink, right at the bound). The soak runs 120 s.
  On a machine busy with other work the p99 criterion cannot be judged: the test measures CPU
  pressure (Linux PSI) and, above MAX_CPU_PRESSURE, skips that one check (saying so).
- A cold-load storm on a worker (hundreds of tenants loading at once) never starves a warm
  tenant: its predictions do not queue behind loads, and misses beyond --max-queued-loads are
  refused with RESOURCE_EXHAUSTED + `retry-after-ms` instead of piling up.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from modelfleet import processes
from modelfleet.demo_models import sample_features
from modelfleet.local_fleet import REPO_ROOT
from modelfleet.v1 import predictor_pb2
from tests.fleet import predict, predictor, register_many, stats, worker_stub
from tests.test_cli import cli
from worker.overload import retry_hint

OTHERS = [f"o{i}" for i in range(6)]
QUOTA_RPS = 5.0
OTHERS_RPS = 300.0
FLOOD_S = 20.0  # a round: 2,000 requests of the others in each phase (the soak floods 120 s)
PERIOD_S = 0.25
MAX_CPU_PRESSURE = 0.25
MAX_P99_RISE = 1.2  # others' p99, flood at the router over flood at the sink


def _measure(stub, x, seconds: float, rps: float = OTHERS_RPS, callers: int = 4) -> list[tuple[float, float, bool]]:
    """The other tenants' traffic: `callers` threads paced to `rps` in all (real traffic arrives
    at its own rate; closed-loop callers would saturate a small machine, and then any extra work
    anywhere shows up as latency). Returns (sent at, time.monotonic(); latency s; ok) per request."""
    samples: list[tuple[float, float, bool]] = []
    start = time.monotonic()
    interval = callers / rps

    def run(index: int) -> None:
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + index * interval / callers + sent * interval
            if now < due:
                time.sleep(due - now)  # pacing
                continue
            tenant = OTHERS[(index + sent) % len(OTHERS)]
            sent += 1
            sent_at, began = time.monotonic(), time.perf_counter()
            try:
                predict(stub, tenant, x, timeout=2)
                samples.append((sent_at, time.perf_counter() - began, True))
            except grpc.RpcError:
                samples.append((sent_at, time.perf_counter() - began, False))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return samples


class CpuPressure:
    """Linux PSI: the share of wall time in which some runnable task waited for a CPU (None-safe)."""

    def __init__(self) -> None:
        self._start = (time.monotonic(), self._total())

    @staticmethod
    def _total() -> int | None:
        try:
            with open("/proc/pressure/cpu") as fh:
                return int(fh.readline().rsplit("total=", 1)[1])
        except (OSError, IndexError, ValueError):
            return None

    def stalled(self) -> float:
        total, (t0, start) = self._total(), self._start
        if total is None or start is None:
            return 0.0
        return (total - start) / 1e6 / (time.monotonic() - t0)


def _child(fleet, *argv: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.flood_client", *argv], cwd=REPO_ROOT, env=fleet.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _p99_ms(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99)) * 1000


def test_a_tenant_flooding_at_10x_its_quota_does_not_hurt_the_others(fleet):
    _flood_and_compare(fleet, QUOTA_RPS, FLOOD_S)


@pytest.mark.soak
def test_soak_a_tenant_flooding_at_10x_its_quota_for_longer(fleet):
    _flood_and_compare(fleet, QUOTA_RPS, 120.0)


PHASES = ("router", "sink", "quiet")


def _flood_and_compare(fleet, quota_rps: float, seconds: float) -> None:
    """The flood cycles, PERIOD_S at a time, between the router, a sink (a process that refuses
    everything at once, as the router does) and a pause, while the other tenants' traffic runs
    throughout; each of their requests counts for the phase it was sent in.

    Why a sink: on a small machine the flood client's own wake-ups move a millisecond p99 by tens
    of percent wherever its requests go; what the *router* adds is the difference between the
    router and sink phases. Why cycle fast: work elsewhere on a shared machine comes in bursts of
    seconds, and a quarter-second cycle spreads each burst over every phase alike. The quiet phases
    are printed (on a machine with cores to spare, sink and quiet agree).

    Why a confidence bound, and a second round: a p99 over 2,000 requests is their 20th slowest,
    and a few stalls of other work that happen to land in router phases move it by tens of percent
    (runs here measured -24..+11 %, one CI run +29 %). The pooled p99 of the router phases over
    that of the sink phases is resampled by whole cycles (_p99_ratio_bounds), and the rise is too
    high when even its lower 95 % bound is above MAX_P99_RISE. When the first round says so, a
    second round is measured and the verdict is the bound over both rounds' cycles together: an
    unlucky burst in one round is diluted by the other, a router that keeps adding is not. What
    that catches, measured by making each refusal dearer on purpose: 3 ms more (the router ~15 %
    busy refusing) +85 % and +111 %, bounds over both +80..+110 %: fails; 1 ms more: +34..+46 %
    and fails on a quiet machine, +10..+25 % and passes on a busy one. A 2-core machine shared
    with other work cannot tell a few percent of p99 from noise."""
    fleet.register("flooder", "v1", seed=5)
    for i, tenant in enumerate(OTHERS):
        fleet.register(tenant, "v1", seed=i)
    fleet.registry.set_limits("flooder", rate=quota_rps, burst=quota_rps)
    fleet.start_workers([(f"w{n}", "default") for n in range(1, 4)])
    router = fleet.start_router(shard_size=2)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    for tenant in OTHERS:
        fleet.wait_for(lambda: predict(stub, tenant, x), what="warm-up")
    sink_address = f"127.0.0.1:{processes.free_port()}"
    sink = _child(fleet, "sink", sink_address.rpartition(":")[2])
    flooder = _child(fleet, "flood", "flooder", str(10 * quota_rps), "1")
    router_cycles: list[list[float]] = []
    sink_cycles: list[list[float]] = []
    try:
        _measure(stub, x, 1.0)  # warm connections and caches, not measured
        command = f"cycle {seconds} {PERIOD_S} {router.address} {sink_address}\n"
        for rounds in (1, 2):
            routed, sunk = _flood_round(stub, x, flooder, command, quota_rps, seconds)
            router_cycles += routed
            sink_cycles += sunk
            low, high = _p99_ratio_bounds(router_cycles, sink_cycles)
            print(f"router phases over sink phases, p99, rounds 1..{rounds}: 95 % bounds {(low - 1) * 100:+.1f}.."
                  f"{(high - 1) * 100:+.1f} %")
            if low <= MAX_P99_RISE:
                break
    finally:
        flooder.stdin.close()
        flooder.wait(10)
        sink.kill()
        sink.wait(10)
    assert low <= MAX_P99_RISE, f"others' p99 rose {(low - 1) * 100:.0f} % or more over the sink phases"


def _flood_round(stub, x, flooder: subprocess.Popen, command: str, quota_rps: float,
                 seconds: float) -> tuple[list[list[float]], list[list[float]]]:
    """One measured round of the flood (see _flood_and_compare): checks the shedding and the
    others' success, and returns the others' latencies of each cycle's router phase and sink phase."""
    pressure = CpuPressure()
    flooder.stdin.write(command)
    flooder.stdin.flush()
    samples = _measure(stub, x, seconds)
    cycle = json.loads(flooder.stdout.readline())
    stalled = pressure.stalled()

    start, period = cycle["start"], cycle["period"]
    by_phase: dict[str, list[tuple[float, bool]]] = {p: [] for p in PHASES}
    by_cycle: dict[str, list[list[float]]] = {p: [[] for _ in range(int(seconds / period / len(PHASES)) + 1)]
                                              for p in PHASES}
    for sent_at, latency, ok in samples:
        if start <= sent_at < start + seconds:
            slot = int((sent_at - start) / period)
            phase = PHASES[slot % len(PHASES)]
            by_phase[phase].append((latency, ok))
            if ok:
                by_cycle[phase][slot // len(PHASES)].append(latency)
    p99 = {p: _p99_ms([lat for lat, ok in v if ok]) for p, v in by_phase.items()}
    flooded = by_phase["router"]
    success = sum(ok for _, ok in flooded) / len(flooded)
    result = cycle["results"][0]
    codes = result["codes"]
    rate = result["sent"] / result["seconds"]
    print(f"flood at {rate:.0f} rps (10 x a quota of {quota_rps:g} rps) in {period * 1000:.0f} ms phases over "
          f"{seconds:g} s: {codes}, retry-after-ms {result['hint_min']}..{result['hint_max']}; the others "
          f"({OTHERS_RPS:g} rps): p99 {p99['quiet']:.2f} ms quiet ({len(by_phase['quiet'])}), {p99['sink']:.2f} ms "
          f"flood at a sink ({len(by_phase['sink'])}), {p99['router']:.2f} ms flood at the router ({len(flooded)}): "
          f"{(p99['router'] / p99['sink'] - 1) * 100:+.1f} % vs sink, {(p99['router'] / p99['quiet'] - 1) * 100:+.1f} "
          f"% vs quiet; success while flooded {success:.4%}; CPU pressure {stalled:.0%}")
    assert all(ok for _, ok in by_phase["quiet"]) and success >= 0.999
    # The flooder: 10x its quota while it floods the router; admitted at most burst + rate x time
    # (the bucket refills in the other phases too), the rest refused with a hint.
    assert rate >= 0.9 * 10 * quota_rps
    assert codes.get("OK", 0) <= quota_rps + quota_rps * (seconds + 1)
    assert codes["RESOURCE_EXHAUSTED"] >= 0.5 * result["sent"]
    assert result["with_hint"] == codes["RESOURCE_EXHAUSTED"] and result["hint_min"] >= 1
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    if stalled > MAX_CPU_PRESSURE:
        pytest.skip(f"shedding checks passed; the p99 criterion was not judged: runnable tasks waited for a CPU "
                    f"{stalled:.0%} of the time (other work on this machine), more than {MAX_CPU_PRESSURE:.0%}")
    return by_cycle["router"], by_cycle["sink"]


def _p99_ratio_bounds(router: list[list[float]], sink: list[list[float]], resamples: int = 2000,
                      level: float = 0.95) -> tuple[float, float]:
    """Two-sided `level` bounds of p99(router phases) / p99(sink phases), by a bootstrap over whole
    cycles: a cycle's router and sink phases are drawn together, so a burst of other work that
    spans them counts as it happened. The generator is seeded: the same samples, the same verdict."""
    rng = np.random.default_rng(0)
    cycles = [(np.asarray(r), np.asarray(s)) for r, s in zip(router, sink) if r and s]
    ratios = np.empty(resamples)
    for i, drawn in enumerate(rng.integers(0, len(cycles), size=(resamples, len(cycles)))):
        ratios[i] = (np.percentile(np.concatenate([cycles[c][0] for c in drawn]), 99)
                     / np.percentile(np.concatenate([cycles[c][1] for c in drawn]), 99))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def test_quota_refusal_carries_retry_after_and_limits_follow_etcd(fleet):
    fleet.register("acme", "v1", seed=1)
    fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1)
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    fleet.wait_for(lambda: predict(stub, "acme", x), what="first predict")
    done = cli(fleet, "set-limits", "acme", "--rate", "1", "--burst", "1")  # what an operator runs
    assert done.returncode == 0 and "rate_limit 1, burst 1, max_inflight default" in done.stdout, done.stderr

    def refused():
        try:
            predict(stub, "acme", x)
            return None
        except grpc.RpcError as exc:
            return exc if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None

    err = fleet.wait_for(refused, timeout=5, what="the limit to reach the router")
    hint = retry_hint(err.trailing_metadata())
    assert hint is not None and 1 <= hint <= 1000
    assert f"retry after {hint} ms" in err.details() and "'acme'" in err.details()
    assert cli(fleet, "set-limits", "acme", "--rate", "default", "--burst", "default").returncode == 0
    fleet.wait_for(lambda: all(predict(stub, "acme", x) for _ in range(20)), timeout=5,
                   what="the default limits to return")


def test_a_cold_load_storm_never_starves_a_warm_tenant(fleet, monkeypatch):
    monkeypatch.setenv("MODELFLEET_MAX_QUEUED_LOADS", "64")
    cold = [f"cold{i:03d}" for i in range(300)]
    fleet.register("warm", "v1", seed=1)
    model = fleet.model_file(7, num_trees=600, num_leaves=63)  # a slow load: 15-70 ms each
    register_many(fleet, [(tenant, "v1") for tenant in cold], model)
    worker = fleet.start_worker("w1", extra=("--load-threads", "2"))
    stub = worker_stub(worker.address)
    x = sample_features(1, 1)[0]
    warm_request = predictor_pb2.PredictRequest(tenant_id="warm", version="v1", features=list(x))
    stub.Predict(warm_request, timeout=10)

    def warm_latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            started = time.perf_counter()
            stub.Predict(warm_request, timeout=2)  # raises on any failure
            out.append(time.perf_counter() - started)
        return out

    warm_latencies(200)
    before = warm_latencies(1000)
    storm_started = time.perf_counter()
    storm = [stub.Predict.future(predictor_pb2.PredictRequest(tenant_id=t, version="v1", features=list(x)),
                                 timeout=60) for t in cold]
    # Every storm request has arrived (each counts a miss, admitted or shed); loads still run.
    fleet.wait_for(lambda: stats(worker.address).misses_total >= len(cold), timeout=30,
                   what="the storm to arrive")
    during = []
    while not all(f.done() for f in storm):  # warm requests for as long as the loads go on
        during += warm_latencies(20)
    storm_s = time.perf_counter() - storm_started
    assert len(during) >= 100, "the storm ended too soon to measure anything"
    codes: dict[str, int] = {}
    hints = []
    for f in storm:
        code = f.code()
        codes[code.name] = codes.get(code.name, 0) + 1
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hints.append(retry_hint(f.trailing_metadata()))
    s = stats(worker.address)
    p99_before, p99_during = (float(np.percentile(v, 99)) * 1000 for v in (before, during))
    print(f"cold-load storm: {len(cold)} cold tenants at once ({codes}; {s.loads_total} loads in {storm_s:.2f} s); "
          f"warm tenant "
          f"p99 {p99_before:.2f} ms before, {p99_during:.2f} ms during the loads ({len(during)} requests), "
          f"max {max(during) * 1000:.1f} ms")
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and None not in hints  # the bound held, with hints
    assert codes.get("OK", 0) >= 64
    # Queued behind the loads, a warm request would wait for (loads ahead / 2 threads) x one load
    # (15-70 ms on 2 cores, day to day): up to the whole storm, 0.6-3 s here. It waits for none;
    # what remains (6-20 ms, under half a load) is the machine being busy with the loads, and
    # glibc's mallinfo2, which the predictor calls around a lone load and which pauses every
    # malloc meanwhile. Both scale with the load, so the bound is a share of the storm, not a
    # fixed time: a fixed floor on the storm's length failed on a fast day (0.45 s with 300-tree
    # models, p99 7.6 ms).
    assert p99_during <= min(100.0, storm_s * 1000 / 10)
