"""Four ways to answer Predict, measured side by side in one run: throughput, p50 and p99.

    direct      client -> worker                       (Worker/Predict, version "v1", and the
                artifact hint a router sends: worker.artifact_hint)
    router      client -> router -> worker             (the real fleet: etcd, workers, --routers
                stateless routers; each caller keeps to one router, as a client's channel would)
    bare_proxy  client -> bare pass-through proxy -> worker   (loadtest.bare_proxy: no routing,
                on the router's wire to the worker (MODELFLEET_WORKER_TRANSPORT): the floor for
                any Python gRPC hop on this stack; callers send the version and artifact hint a
                router would add, so the worker's work is the same)
    naive       client -> naive server                 (loadtest.naive_server: one process,
                Booster(model_str=...) on first use, cachetools LRU by count, Booster.predict)

Mixes: `warm` (8 tenants, all cached) and the miss-heavy `zipf10k` / `zipf100k` (tenants drawn
Zipf s=1.1 over 10k / 100k tenants; worker and naive caches hold --cache-models models, fewer
than the working set, so misses happen). Rows per request: 1 and 100. Concurrency: fixed
levels of closed-loop callers (each sends its next request when the last one is answered).

Set-up is fast because tenants SHARE a few distinct artifacts: --artifacts models are trained
and stored once, and every tenant gets a route + version record pointing at one of them,
written straight into etcd in batched transactions (64 tenants = 128 ops per transaction). A
worker or the naive server still parses each tenant's model separately on a miss: the cache
is per tenant, not per artifact.

The load generators are their own processes (multiprocessing spawn), started once and reused
for every cell; each runs its share of the callers on one grpc.aio event loop over one channel
per server, with requests prebuilt as bytes (a serialised tenant field + one of 64 feature
blocks + version), so client CPU per request is small and the same for every path. Before its
first cell of a mix, each server answers --mix-warmup cache generations of that mix, unmeasured
(see _prime), and every cell first runs a short warm-up that is not measured; caches carry over
between cells. rps counts requests completed inside the measured
window; p50/p99 are over their individual latencies. --rounds R measures each cell in R segments
with the paths taking turns, so that a machine whose speed drifts during a run (a shared 2-core
box does) hurts every path alike (see run_cells).

After the table, `print_figures`: the issue's figures cell by cell (the router against the bare
proxy and, on the Zipf mixes, against the naive server), each marked as holding or not, and a
line saying so when cells were measured too briefly to judge them by.

Also per cell: the cache miss ratio and the models held at its end (worker Stats / the naive
server's Stats), the server processes' RSS at its end, and CPU time per request (µs, from
/proc) of the client (generators), the hop (router or bare proxy) and the server (workers or
the naive server). On a small or shared machine every process competes for
the same cores, so rps and latency move with whatever else runs; CPU per request moves much
less, and is the number to read when asking where a path's time goes.

    python -m loadtest.bench                      # full: 3 mixes x rows 1,100 x concurrency 1,8,32
    python -m loadtest.bench --quick --json F     # a subset of cells, all four paths, < 90 s on 2 cores
    python -m loadtest.bench --mixes zipf10k,zipf100k --rows 1 --concurrency 8,32 --paths router,naive \
        --duration 6 --rounds 3                   # two paths compared in alternating 2 s segments
    python -m loadtest.bench --workers 4 --routers 3 --gen-procs 4 --equal-memory --concurrency 8,32   # 16 cores

Every server process of every path (workers, routers, the bare proxy, the naive server) runs on
one malloc, --allocator (MODELFLEET_ALLOCATOR; default auto: jemalloc where the system has it),
so that the paths differ by design only; `--allocator system` gives glibc's to all of them.

--equal-memory gives each worker --cache-models / --workers models, so the fleet holds in all
what the naive server holds (without it each worker holds --cache-models, and N workers hold N
times the naive server's models).

With --workers N > 1, `direct` sends each tenant to the first worker of its shard (what the
router does while nothing spills) and `router` spreads over the fleet, but `bare_proxy` still
forwards to ONE worker (it does not route): compare router with bare_proxy on
--workers 1, where both hop to the same single worker.

Writes OUT/bench.json (a list of records: path, mix, rows, concurrency, rps, p50_ms, p99_ms,
errors, requests, cores, ...), OUT/bench.png, and prints a table; --out defaults to ./bench-out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from modelfleet import allocator, config, processes
from modelfleet.errors import ModelfleetError
from modelfleet.procfs import cpu_seconds, rss_bytes

PATHS = ("direct", "router", "bare_proxy", "naive")
MIX_TENANTS = {"warm": 8, "zipf10k": 10_000, "zipf100k": 100_000}
ZIPF_S = 1.1
VERSION = "v1"
PUBLIC_METHOD = "/modelfleet.v1.Predictor/Predict"
WORKER_METHOD = "/modelfleet.v1.Worker/Predict"
NAIVE_STATS_METHOD = "/loadtest.Naive/Stats"
TXN_TENANTS = 64  # 2 ops per tenant; etcd allows at most 128 ops per transaction
FEATURE_BLOCKS = 64
REQUEST_TIMEOUT_S = 10.0
PRIME_CALLERS = 32  # a priming run's callers (see _prime)
PRIME_LIMIT_S = 120.0  # and its longest


def tenant_name(mix: str, i: int) -> str:
    """warm-0..7 for the warm mix; t-000000.. shared by both Zipf mixes (zipf10k is a prefix)."""
    return f"warm-{i}" if mix == "warm" else f"t-{i:06d}"


# --- the load generator (runs in its own processes) ---------------------------------------------

def zipf_ranks(n: int, size: int, rng: np.random.Generator, s: float = ZIPF_S) -> np.ndarray:
    """`size` draws from a Zipf(s) law bounded to ranks 0..n-1 (rank 0 the hottest)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n - 1)


def tenant_draws(mix: str, n: int, size: int, seed: int) -> np.ndarray:
    """Tenant indices for `size` requests. Zipf ranks map to tenants through a fixed permutation
    (the same in every generator process), so the hot tenants are scattered over shards."""
    rng = np.random.default_rng(seed)
    if mix == "warm":
        return rng.integers(0, n, size)
    perm = np.random.default_rng(12345).permutation(n)
    return perm[zipf_ranks(n, size, rng)]


def feature_blocks(rows: int, num_features: int, seed: int) -> list[bytes]:
    """FEATURE_BLOCKS serialised `features` fields of `rows` realistic rows each."""
    from modelfleet.demo_models import sample_features
    from modelfleet.v1 import predictor_pb2

    x = sample_features(seed, FEATURE_BLOCKS * rows, num_features).reshape(FEATURE_BLOCKS, -1)
    return [predictor_pb2.PredictRequest(features=block.tolist()).SerializeToString() for block in x]


async def _run_cell(spec: dict, channels: dict[str, grpc.aio.Channel]) -> dict:
    from modelfleet.rpc import CHANNEL_OPTIONS
    from modelfleet.v1 import predictor_pb2

    calls = []
    for address in spec["addresses"]:
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        calls.append(channels[address].unary_unary(spec["method"]))  # bytes in, bytes out
    route = spec.get("route")  # tenant index -> index into calls (direct path), or None: caller k uses k % len
    hints = spec.get("artifacts") or [""]  # tenant t's artifact hint: hints[t % len] ("": none)
    mix, n = spec["mix"], spec["tenants"]
    draws = tenant_draws(mix, n, 1 << 18, spec["seed"])
    blocks = feature_blocks(spec["rows"], spec["num_features"], spec["seed"])
    version = predictor_pb2.PredictRequest(version=spec["version"]).SerializeToString()
    prefix_cache: dict[int, bytes] = {}

    def request_for(t: int, j: int) -> bytes:
        head = prefix_cache.get(t)
        if head is None:
            head = prefix_cache[t] = predictor_pb2.PredictRequest(
                tenant_id=tenant_name(mix, t), artifact_sha256=hints[t % len(hints)]).SerializeToString()
        return head + blocks[j % FEATURE_BLOCKS] + version  # concatenated messages merge into one

    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    measure_from = time.perf_counter() + spec["warmup"]
    end = measure_from + spec["duration"]
    latencies: list[float] = []
    errors: Counter = Counter()
    late: list[float] = []  # calls sent in the window and answered after it: a stall must show in p99
    response_bytes = 0
    callers = spec["concurrency"]
    # A priming run (run_cells) stops after this many requests, or at `end`, whichever is first.
    limit = spec.get("requests") or float("inf")

    async def caller(k: int) -> None:
        nonlocal response_bytes
        j = k
        perf = time.perf_counter
        while perf() < end and j < limit:
            t = int(draws[j % len(draws)])
            call = calls[route[t]] if route is not None else calls[k % len(calls)]
            request = request_for(t, j)
            j += callers
            started = perf()
            code = None
            try:
                response = await call(request, timeout=REQUEST_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            done = perf()
            if measure_from <= done <= end:
                if code is None:
                    latencies.append(done - started)
                    response_bytes += len(response)
                else:
                    errors[code] += 1
            elif done > end and started >= measure_from:
                late.append(done - started)
                if code is not None:
                    errors[code] += 1

    await asyncio.gather(*(caller(k) for k in range(callers)))
    return {"latencies": np.asarray(latencies, dtype=np.float64).tobytes(), "errors": dict(errors),
            "late": np.asarray(late, dtype=np.float64).tobytes(), "response_bytes": response_bytes}


def _generator_main(conn) -> None:
    """A generator process: runs cells sent over `conn` until it receives None."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        while True:
            spec = conn.recv()
            if spec is None:
                break
            try:
                conn.send(loop.run_until_complete(_run_cell(spec, channels)))
            except Exception as exc:  # noqa: BLE001 - report, keep serving cells
                conn.send({"failed": f"{type(exc).__name__}: {exc}"})
    finally:
        for channel in channels.values():
            loop.run_until_complete(channel.close())
        loop.close()


class Generators:
    """`count` generator processes, started once (spawn) and reused for every cell.

    They start with SIGINT ignored (an ignored signal stays ignored across exec, and Python
    keeps it so): a terminal's Ctrl-C reaches the whole process group, and each generator
    would otherwise print a KeyboardInterrupt traceback of its own. The bench stops them.
    A context manager: leaving it by an exception (Ctrl-C, SIGTERM, a failure) terminates them
    at once instead of waiting for the cell they are in the middle of."""

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the spawned interpreters
        try:
            for _ in range(count):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_generator_main, args=(child,), daemon=True)
                proc.start()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> "Generators":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for proc in self.procs:  # mid-cell: nothing they would send back is wanted now
                proc.terminate()
        self.close()

    def run(self, spec: dict, concurrency: int, on_measuring=None) -> tuple[np.ndarray, np.ndarray, Counter, int]:
        """Splits `concurrency` callers over the processes; returns (latencies s, errors, bytes)."""
        n = len(self.conns)
        shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
        spec = dict(spec, start_at=time.time() + 0.2)
        busy = []
        for i, (conn, share) in enumerate(zip(self.conns, shares)):
            if share:
                part = dict(spec, concurrency=share, seed=spec["seed"] * 1000 + i)
                if spec.get("requests"):  # a priming run's requests, split as the callers are
                    part["requests"] = -(-spec["requests"] * share // concurrency)
                conn.send(part)
                busy.append(conn)
        if on_measuring is not None:
            time.sleep(max(0.0, spec["start_at"] + spec["warmup"] - time.time()))
            on_measuring()
        latencies, late, errors, nbytes = [], [], Counter(), 0
        for conn in busy:
            result = conn.recv()
            if "failed" in result:
                raise RuntimeError(f"load generator failed: {result['failed']}")
            latencies.append(np.frombuffer(result["latencies"], dtype=np.float64))
            late.append(np.frombuffer(result["late"], dtype=np.float64))
            errors.update(result["errors"])
            nbytes += result["response_bytes"]
        return np.concatenate(latencies), np.concatenate(late), errors, nbytes

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# --- the fleet and the other servers ------------------------------------------------------------

@dataclass
class Artifact:
    artifact: str  # relative to the store root
    sha256: str
    size: int
    num_features: int
    num_classes: int
    objective: str
    model_file: Path
    nbytes: int  # LoadedModel's measured native size


def register_bulk(client, keys, tenants: list[str], artifacts: list[Artifact], version: str = VERSION) -> None:
    """Route + version records for every tenant (tenant i -> artifact i % len), 64 per transaction.

    Straight into etcd with the schema module's records: the registry's one-CAS-per-tenant path
    would take minutes for 100k tenants; a benchmark's fleet starts empty, so no compare needed.
    """
    from version_service.schema import RouteRecord, VersionRecord

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    routes = [RouteRecord(serving=version, newest=version, serving_sha256=a.sha256).to_json() for a in artifacts]
    records = [VersionRecord(version=version, artifact=a.artifact, sha256=a.sha256, num_features=a.num_features,
                             num_classes=a.num_classes, bytes=a.size, created=created,
                             objective=a.objective).to_json() for a in artifacts]
    txn = client.transactions
    for start in range(0, len(tenants), TXN_TENANTS):
        ops = []
        for i in range(start, min(start + TXN_TENANTS, len(tenants))):
            ops.append(txn.put(keys.version(tenants[i], version), records[i % len(artifacts)]))
            ops.append(txn.put(keys.route(tenants[i]), routes[i % len(artifacts)]))
        client.transaction(compare=[], success=ops, failure=[])


def wait_serving(address: str, proc, what: str, timeout: float = 30.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def ready() -> bool:
        if proc.poll() is not None:
            raise ChildProcessError(f"{what} exited with {proc.returncode}")
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        return status == health_pb2.HealthCheckResponse.SERVING

    try:
        processes.wait_for(ready, timeout, interval=0.05, what=f"{what} on {address}")
    except TimeoutError as exc:
        if isinstance(exc.__cause__, ChildProcessError):
            raise exc.__cause__ from None
        raise


def spawn_module(module: str, argv: list[str], log_path: Path, env: dict[str, str]):
    with open(log_path, "ab") as fh:
        return processes.spawn([sys.executable, "-m", module, *argv], env=env, stdout=fh, stderr=fh)


def start_naive(manifest: Path, cache_models: int, log_path: Path, env: dict[str, str], threads: int = 16):
    """Spawns loadtest.naive_server; returns (popen, address) without waiting for it."""
    port = processes.free_port()
    proc = spawn_module("loadtest.naive_server", ["--port", str(port), "--manifest", str(manifest),
                                                  "--cache-models", str(cache_models), "--threads", str(threads)],
                        log_path, env)
    return proc, f"127.0.0.1:{port}"


def start_bare_proxy(worker: str, log_path: Path, env: dict[str, str]):
    """Spawns loadtest.bare_proxy in front of `worker`; returns (popen, address) without waiting."""
    port = processes.free_port()
    return spawn_module("loadtest.bare_proxy", ["--port", str(port), "--worker", worker], log_path, env), \
        f"127.0.0.1:{port}"


def write_manifest(path: Path, store: Path, groups: list[list[str]], artifacts: list[Artifact]) -> None:
    """The naive server's manifest: tenant i of each group gets artifact i % len, as registered."""
    doc = {"store": str(store), "version": VERSION,
           "tenants": {t: artifacts[i % len(artifacts)].artifact for names in groups for i, t in enumerate(names)}}
    path.write_text(json.dumps(doc, separators=(",", ":")))


@dataclass
class Bench:
    """Everything one run needs, started in `start` and torn down in `stop`."""

    args: argparse.Namespace
    root: Path
    etcd: object = None
    fleet: object = None
    artifacts: list[Artifact] = field(default_factory=list)
    tenant_counts: dict[str, int] = field(default_factory=dict)
    workers: list = field(default_factory=list)
    routers: list = field(default_factory=list)
    naive: tuple = ()
    bare: tuple = ()
    routes: dict[str, np.ndarray] = field(default_factory=dict)
    cache_models: int = 0
    worker_cache_models: int = 0

    def start(self, log=print) -> None:
        from modelfleet.etcd_server import EtcdServer
        from modelfleet.local_fleet import LocalFleet
        from modelfleet.store import LocalStore
        from worker.predictor import LoadedModel

        args = self.args
        t0 = time.monotonic()
        self.etcd = EtcdServer(data_dir=self.root / "etcd", log_path=self.root / "etcd.log").start()
        self.fleet = LocalFleet(self.etcd.endpoint, f"/bench/{uuid.uuid4().hex[:8]}", self.root / "fleet")
        store = LocalStore(self.fleet.store_dir)
        for seed in range(args.artifacts):
            path = self.fleet.model_file(seed, num_features=args.features, num_trees=args.trees,
                                         num_leaves=args.leaves)
            stored = store.put_file(path)
            text = path.read_text()
            model = LoadedModel.from_model_text(text)
            objective = next((line.split("=", 1)[1].split()[0] for line in text.splitlines()[:40]
                              if line.startswith("objective=")), "")
            self.artifacts.append(Artifact(stored.artifact, stored.sha256, stored.size, model.num_features,
                                           model.num_classes, objective, path, model.nbytes))
            model.close()
        tenants: list[str] = []
        for mix in args.mixes:
            n = MIX_TENANTS[mix] if mix == "warm" else min(MIX_TENANTS[mix], args.max_tenants)
            self.tenant_counts[mix] = n
        zipf_n = max((n for m, n in self.tenant_counts.items() if m != "warm"), default=0)
        groups = [[tenant_name("zipf", i) for i in range(zipf_n)]]
        if "warm" in args.mixes:
            groups.append([tenant_name("warm", i) for i in range(MIX_TENANTS["warm"])])
        for names in groups:  # tenant i of a mix gets artifact i % --artifacts (the generators know it)
            register_bulk(self.fleet.client, self.fleet.keys, names, self.artifacts)
            tenants += names
        manifest = self.root / "naive-manifest.json"
        write_manifest(manifest, self.fleet.store_dir, groups, self.artifacts)
        log(f"set-up: {len(tenants)} tenants over {len(self.artifacts)} artifacts registered "
            f"in {time.monotonic() - t0:.1f}s")

        smallest_zipf = min((n for m, n in self.tenant_counts.items() if m != "warm"), default=0)
        self.cache_models = args.cache_models or max(16, min(1000, smallest_zipf // 10))
        self.worker_cache_models = max(1, self.cache_models // args.workers) if args.equal_memory else self.cache_models
        model_bytes = max(a.nbytes for a in self.artifacts)
        env = self.fleet.env()
        self.naive = start_naive(manifest, self.cache_models, self.root / "naive.log", env)
        self.workers = self.fleet.start_workers(
            [(f"w{i}", "default") for i in range(1, args.workers + 1)],
            cache_bytes=int(self.worker_cache_models * model_bytes * 1.05))
        self.bare = start_bare_proxy(self.workers[0].address, self.root / "bare_proxy.log", env)
        self.routers = self.fleet.start_routers(args.routers, shard_size=min(args.shard_size, args.workers))
        wait_serving(self.naive[1], self.naive[0], "naive_server")
        wait_serving(self.bare[1], self.bare[0], "bare_proxy")

        from sharding import Member, fleet_shards
        members = [Member(w.name, "default") for w in self.workers]
        for mix, n in self.tenant_counts.items():
            names = [tenant_name(mix, i) for i in range(n)]
            self.routes[mix] = fleet_shards(names, members, min(args.shard_size, args.workers))[:, 0].astype(np.int16)
        log(f"set-up: etcd, {len(self.workers)} worker(s), {len(self.routers)} router(s), bare_proxy, naive_server up "
            f"in {time.monotonic() - t0:.1f}s (cache {self.cache_models} models in the naive server, "
            f"{self.worker_cache_models} in each worker, ~{model_bytes // 1024} KiB each)")

    def target(self, path: str, mix: str) -> dict:
        """What a generator dials for `path`: addresses, method, version, per-tenant route."""
        hints = [a.sha256 for a in self.artifacts]  # what a router puts in each request (worker.artifact_hint)
        if path == "direct":
            return {"addresses": [w.address for w in self.workers], "method": WORKER_METHOD, "version": VERSION,
                    "route": self.routes[mix], "artifacts": hints}
        if path == "router":
            return {"addresses": [r.address for r in self.routers], "method": PUBLIC_METHOD, "version": ""}
        if path == "bare_proxy":  # the version and hint a router would add, so the worker does the same work
            return {"addresses": [self.bare[1]], "method": PUBLIC_METHOD, "version": VERSION, "artifacts": hints}
        return {"addresses": [self.naive[1]], "method": PUBLIC_METHOD, "version": ""}

    def pids(self, path: str) -> dict[str, list[int]]:
        """The processes behind `path`: `hop` (router or proxy) and `server` (workers or naive)."""
        workers = [w.popen.pid for w in self.workers]
        return {"direct": {"hop": [], "server": workers},
                "router": {"hop": [r.popen.pid for r in self.routers], "server": workers},
                "bare_proxy": {"hop": [self.bare[0].pid], "server": workers[:1]},
                "naive": {"hop": [], "server": [self.naive[0].pid]}}[path]

    def cache_stats(self, path: str) -> tuple[int | None, int | None]:
        """(cache misses so far, models held now) on the server(s) behind `path`, from worker
        Stats or the naive server's Stats; (None, None) if they can't be read."""
        try:
            if path == "naive":
                with grpc.insecure_channel(self.naive[1]) as channel:
                    doc = json.loads(channel.unary_unary(NAIVE_STATS_METHOD)(b"", timeout=5))
                return int(doc["misses"]), int(doc["models"])
            from modelfleet.v1 import worker_pb2, worker_pb2_grpc
            misses = models = 0
            for w in self.workers:
                with grpc.insecure_channel(w.address) as channel:
                    stats = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=5)
                misses += stats.misses_total
                models += stats.models_loaded
            return misses, models
        except grpc.RpcError:
            return None, None

    def stop(self) -> None:
        for pair in (self.bare, self.naive):
            if pair:
                processes.stop(pair[0])
        if self.fleet is not None:
            self.fleet.stop()
        if self.etcd is not None:
            self.etcd.cleanup()


# --- running the cells ------------------------------------------------------------------------

def run_cells(bench: Bench, gens: Generators, args: argparse.Namespace, log=print) -> list[dict]:
    """One record per cell (mix, rows, concurrency, path), in that order.

    With --rounds R, a cell's --duration is measured in R segments, and the paths of a
    (mix, rows, concurrency) group take turns segment by segment, each round in a rotated order
    (R = 2 with two paths: A B, B A). A machine that slows down or speeds up during a group then
    hits every path alike instead of whichever ran last. A record pools its segments: rps over
    their summed time, p50 and p99 over all their latencies, CPU and misses per request over all
    their requests; `segments` keeps each one's rps and p99."""
    records = []
    warmed: set[tuple[str, str]] = set()
    groups = [(mix, rows, conc) for mix in args.mixes for rows in args.rows for conc in args.concurrency]
    total, n = len(groups) * len(args.paths) * args.rounds, 0
    segment_s = args.duration / args.rounds
    for mix, rows, conc in groups:
        measured: dict[str, list[dict]] = {path: [] for path in args.paths}
        for round_ in range(args.rounds):
            shift = round_ % len(args.paths)
            for path in args.paths[shift:] + args.paths[:shift]:
                n += 1
                server = "naive" if path == "naive" else "worker"
                spec = dict(bench.target(path, mix), mix=mix, tenants=bench.tenant_counts[mix], rows=rows,
                            num_features=args.features, warmup=args.warmup, duration=segment_s, seed=n)
                if (server, mix) not in warmed:
                    warmed.add((server, mix))
                    _prime(bench, gens, args, spec, server, log)
                segment = _measure_segment(bench, gens, spec, path, conc)
                measured[path].append(segment)
                ok = len(segment["latencies"])
                log(f"[{n}/{total}] {path:<10} {mix:<8} rows={rows:<3} c={conc:<3} "
                    + (f"round {round_ + 1}/{args.rounds} " if args.rounds > 1 else "")
                    + f"{ok / segment_s:8.0f} rps  p50 {_percentile_ms(segment['latencies'], 50):7.2f} ms  "
                    f"p99 {_percentile_ms(segment['latencies'], 99):7.2f} ms"
                    + (f"  errors {sum(segment['errors'].values())} {dict(segment['errors'])}"
                       if segment["errors"] else ""))
        for path in args.paths:
            records.append(_record(bench, args, path, mix, rows, conc, measured[path], segment_s))
    return records


def _prime(bench: Bench, gens: Generators, args: argparse.Namespace, spec: dict, server: str, log) -> None:
    """Before a server's first cell of a mix: --mix-warmup x (the models its cache holds of this
    mix) requests of the mix, unmeasured, so that cells measure the mix and not the change from
    the one before. An LRU follows a new hot set within a cache generation or two; W-TinyLFU's
    frequency sketch must first forget the old one, which takes ~20-30 generations for a switch
    from Zipf over 10k tenants to Zipf over 100k (`python -m loadtest.bench_cache_policy`)."""
    held = bench.cache_models if server == "naive" else bench.worker_cache_models * len(bench.workers)
    requests = int(args.mix_warmup * min(held, spec["tenants"]))
    if requests <= 0:
        return
    started = time.monotonic()
    gens.run(dict(spec, warmup=0.0, duration=PRIME_LIMIT_S, requests=requests, seed=spec["seed"] + 7919),
             PRIME_CALLERS)
    log(f"[prime] {server:<10} {spec['mix']:<8} {requests:,} requests in {time.monotonic() - started:.1f} s")


def _without_nan(value):
    """JSON has no NaN: null instead (a cell that got no answer has no latency)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


def _percentile_ms(latencies: np.ndarray, q: float) -> float:
    return float(np.percentile(latencies, q) * 1e3) if len(latencies) else float("nan")


def _measure_segment(bench: Bench, gens: Generators, spec: dict, path: str, conc: int) -> dict:
    """One measured stretch of one path: its latencies and errors, and the cache, RSS and CPU
    readings of its processes at the start and the end of the measured window."""
    pids = dict(bench.pids(path), client=[p.pid for p in gens.procs])

    def snapshot() -> dict:
        misses, models = bench.cache_stats(path)
        return {"misses": misses, "models": models, "rss": rss_bytes(pids["server"]),
                **{k: cpu_seconds(v) for k, v in pids.items()}}

    before: dict = {}
    latencies, late, errors, nbytes = gens.run(spec, conc, on_measuring=lambda: before.update(snapshot()))
    return {"latencies": latencies, "late": late, "errors": errors, "response_bytes": nbytes, "before": before,
            "after": snapshot(), "kinds": [kind for kind, found in pids.items() if found]}


def _record(bench: Bench, args: argparse.Namespace, path: str, mix: str, rows: int, conc: int,
            segments: list[dict], segment_s: float) -> dict:
    ok = sum(len(s["latencies"]) for s in segments)  # answered inside the measured windows: rps
    lat = np.concatenate([s["latencies"] for s in segments] + [s["late"] for s in segments])  # + the late ones
    late = sum(int(s["late"].size) for s in segments)
    errors: Counter = Counter()
    for s in segments:
        errors.update(s["errors"])
    n_err = sum(errors.values())
    requests = ok + late + n_err
    last = segments[-1]["after"]

    def delta_per_request(kind: str) -> float | None:
        """kind's growth from the start to the end of each segment, summed, per request."""
        growth = 0.0
        for s in segments:
            start, end = s["before"].get(kind), s["after"].get(kind)
            if start is None or end is None or not requests:
                return None
            growth += end - start
        return growth / requests

    def cpu_us(kind: str) -> float | None:  # kind: client, hop or server
        per_request = delta_per_request(kind) if kind in segments[0]["kinds"] else None
        return None if per_request is None else per_request * 1e6

    return {
        "path": path, "mix": mix, "tenants": bench.tenant_counts[mix], "rows": rows, "concurrency": conc,
        "rps": ok / (segment_s * len(segments)),
        "p50_ms": _percentile_ms(lat, 50), "p99_ms": _percentile_ms(lat, 99),
        "mean_ms": float(lat.mean() * 1e3) if lat.size else None,
        "errors": n_err, "error_codes": dict(errors), "requests": requests,
        "answered_late": late,  # sent in a window, answered after it: in the percentiles, not in rps
        "miss_ratio": delta_per_request("misses"),
        "client_cpu_us": cpu_us("client"), "hop_cpu_us": cpu_us("hop"), "server_cpu_us": cpu_us("server"),
        "models_held": last["models"],
        "server_rss_mb": None if last["rss"] is None else last["rss"] / 2**20,
        "response_bytes": sum(s["response_bytes"] for s in segments), "cores": os.cpu_count(),
        "workers": args.workers, "routers": args.routers, "gen_procs": args.gen_procs,
        "cache_models": bench.cache_models, "worker_cache_models": bench.worker_cache_models,
        "duration_s": args.duration, "rounds": len(segments),
        "segments": [{"rps": len(s["latencies"]) / segment_s,
                      "p99_ms": _percentile_ms(np.concatenate([s["latencies"], s["late"]]), 99)} for s in segments],
        "model": f"{args.trees} trees x {args.leaves} leaves, {args.features} features",
        "allocator": args.allocator,
    }


# --- output -----------------------------------------------------------------------------------

def print_table(records: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    direct = {(r["mix"], r["rows"], r["concurrency"]): r["rps"] for r in records if r["path"] == "direct"}
    table = Table(title=f"Predict paths, closed loop: {os.cpu_count()} cores (os.cpu_count()), "
                        f"{args.workers} worker(s), {args.routers} router(s), {args.gen_procs} generator process(es), "
                        f"{args.duration:g}s per cell, model {args.trees}x{args.leaves}, malloc {args.allocator}")
    for column in ("path", "mix", "tenants", "rows", "conc", "rps", "vs direct", "p50 ms", "p99 ms", "miss %",
                   "models held", "server RSS MB", "CPU µs/req client|hop|server", "errors/requests"):
        table.add_column(column, justify="left" if column in ("path", "mix") else "right")
    last = None
    for r in records:
        group = (r["mix"], r["rows"], r["concurrency"])
        if last is not None and group != last:
            table.add_section()
        last = group
        base = direct.get(group)
        table.add_row(r["path"], r["mix"], str(r["tenants"]), str(r["rows"]), str(r["concurrency"]),
                      f"{r['rps']:.0f}", f"{r['rps'] / base:.2f}x" if base else "-",
                      f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      "-" if r["miss_ratio"] is None else f"{100 * r['miss_ratio']:.1f}",
                      "-" if r["models_held"] is None else str(r["models_held"]),
                      "-" if r["server_rss_mb"] is None else f"{r['server_rss_mb']:.0f}",
                      " | ".join("-" if r[k] is None else f"{r[k]:.0f}"
                                 for k in ("client_cpu_us", "hop_cpu_us", "server_cpu_us")),
                      f"{r['errors']}/{r['requests']}")
    Console(width=190).print(table)


# The figures for the paths compared in one cell: the router's hop against the floor of
# any Python hop (rps >= 0.8 x, p99 <= 1.3 x the bare proxy's), and on the miss-heavy mixes the
# fleet against the naive design (more rps, lower p99).
HOP_MIN_RPS, HOP_MAX_P99 = 0.8, 1.3
JUDGED_DURATION_S, JUDGED_ROUNDS = 6.0, 3  # what the README's 2-core figures are measured with


def figures(records: list[dict]) -> list[dict]:
    """Per (mix, rows, concurrency) cell with a router record: its ratios to the bare proxy and
    to the naive server (None where that path was not run), and whether each figure holds
    (None where it does not apply: the naive comparison is for the Zipf mixes)."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records:
        cells.setdefault((r["mix"], r["rows"], r["concurrency"]), {})[r["path"]] = r
    out = []
    for (mix, rows, conc), paths in cells.items():
        router = paths.get("router")
        if router is None:
            continue
        row = {"mix": mix, "rows": rows, "concurrency": conc}
        for other in ("bare_proxy", "naive"):
            base = paths.get(other)
            row[f"rps_vs_{other}"] = router["rps"] / base["rps"] if base and base["rps"] else None
            row[f"p99_vs_{other}"] = router["p99_ms"] / base["p99_ms"] if base and base["p99_ms"] else None
        row["hop_ok"] = (None if row["rps_vs_bare_proxy"] is None else
                         row["rps_vs_bare_proxy"] >= HOP_MIN_RPS and row["p99_vs_bare_proxy"] <= HOP_MAX_P99)
        row["beats_naive"] = (None if row["rps_vs_naive"] is None or mix == "warm" else
                              row["rps_vs_naive"] > 1 and row["p99_vs_naive"] < 1)
        out.append(row)
    return out


def print_figures(records: list[dict]) -> None:
    """The issue's figures, cell by cell, so that a run says itself whether they hold.

    Short cells get a line under the table: one `--quick` cell (1 s, one round) has shown the
    router at 0.78 x the bare proxy where 6 s in 3 alternating rounds showed 0.96 x, and a bare NO
    reads as a regression."""
    from rich.console import Console
    from rich.table import Table

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "NO")

    table = Table(title=f"router against the bare proxy (rps >= {HOP_MIN_RPS}x, p99 <= {HOP_MAX_P99}x) "
                        f"and the naive server (Zipf mixes: more rps, lower p99)")
    for column in ("mix", "rows", "conc", "rps / bare", "p99 / bare", "hop ok", "rps / naive", "p99 / naive",
                   "beats naive"):
        table.add_column(column, justify="left" if column == "mix" else "right")
    for f in figures(records):
        table.add_row(f["mix"], str(f["rows"]), str(f["concurrency"]), ratio(f["rps_vs_bare_proxy"]),
                      ratio(f["p99_vs_bare_proxy"]), verdict(f["hop_ok"]), ratio(f["rps_vs_naive"]),
                      ratio(f["p99_vs_naive"]), verdict(f["beats_naive"]))
    console = Console(width=190)
    console.print(table)
    seconds = min((r["duration_s"] for r in records), default=JUDGED_DURATION_S)
    rounds = min((r["rounds"] for r in records), default=JUDGED_ROUNDS)
    if seconds < JUDGED_DURATION_S or rounds < JUDGED_ROUNDS:
        console.print(f"cells of {seconds:g} s in {rounds} round(s): noisy on a shared machine; the figures are "
                      f"judged with --duration {JUDGED_DURATION_S:g} --rounds {JUDGED_ROUNDS}", highlight=False)


def plot(records: list[dict], path: Path, title: str) -> None:
    """A panel pair per (mix, rows): requests/s, and p99 (bar) with p50 (tick) on a log scale;
    bars grouped by concurrency, one colour per path. Mixes go down, rows per request across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    mixes = [m for m in MIX_TENANTS if any(r["mix"] == m for r in records)]
    row_counts = sorted({r["rows"] for r in records})
    paths = [p for p in PATHS if any(r["path"] == p for r in records)]
    levels = sorted({r["concurrency"] for r in records})
    colors = {"direct": "tab:green", "router": "tab:blue", "bare_proxy": "tab:gray", "naive": "tab:red"}
    width = 0.8 / len(paths)
    width_in = 1.0 + (2.6 + 1.0 * len(levels)) * len(row_counts)
    # constrained layout keeps the (wrapped) title clear of the first panel's title
    fig, axes = plt.subplots(2 * len(mixes), len(row_counts), squeeze=False, layout="constrained",
                             figsize=(width_in, 0.6 + 2.7 * 2 * len(mixes)))
    for m, mix in enumerate(mixes):
        for col, rows in enumerate(row_counts):
            top, bottom = axes[2 * m][col], axes[2 * m + 1][col]
            cell = {(r["path"], r["concurrency"]): r for r in records if r["mix"] == mix and r["rows"] == rows}
            for i, p in enumerate(paths):
                xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(levels))]
                got = [cell.get((p, c)) for c in levels]
                top.bar(xs, [r["rps"] if r else 0 for r in got], width, color=colors[p], label=p)
                bottom.bar(xs, [r["p99_ms"] if r else 0 for r in got], width, color=colors[p], alpha=0.85)
                bottom.scatter(xs, [r["p50_ms"] if r else float("nan") for r in got], marker="_", s=120,
                               color="black", zorder=3, label="p50" if i == 0 else None)
            top.set_title(f"{mix}, {rows} row{'s' if rows != 1 else ''}/request")
            top.set_ylabel("requests / s")
            bottom.set_ylabel("p99 ms (bar), p50 (tick)")
            bottom.set_yscale("log")
            bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            bottom.yaxis.set_major_formatter(ScalarFormatter())
            bottom.yaxis.set_minor_formatter(NullFormatter())
            for ax in (top, bottom):
                ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
                ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(textwrap.fill(title, width=int(width_in * 9)))  # ~9 characters an inch at its size
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the command ------------------------------------------------------------------------------

def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short cells, mixes warm,zipf10k, concurrency 8 (all four paths; < 90 s on 2 cores)")
    parser.add_argument("--duration", type=float, help="measured seconds per cell (default 2, quick 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each cell in this many segments, the paths taking turns (see run_cells)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each cell (default 0.5, quick 0.3)")
    parser.add_argument("--mix-warmup", type=float,
                        help="requests of a mix each server answers, unmeasured, before its first cell of "
                             "that mix, in cache generations (x the models its cache holds of the mix; "
                             "default 30, quick 2; see _prime)")
    parser.add_argument("--concurrency", type=_csv(int), help="callers per cell (default 1,8,32; quick 8)")
    parser.add_argument("--rows", type=_csv(int), help="rows per request (default 1,100)")
    parser.add_argument("--mixes", type=_csv(str), help="warm,zipf10k,zipf100k (quick: warm,zipf10k)")
    parser.add_argument("--paths", type=_csv(str), default=list(PATHS), help="direct,router,bare_proxy,naive")
    parser.add_argument("--max-tenants", "--tenants", dest="max_tenants", type=int, default=100_000,
                        help="cap on the Zipf mixes' tenant counts (smoke tests); records say what ran")
    parser.add_argument("--workers", type=int, default=1, help="fleet workers (more on a bigger machine)")
    parser.add_argument("--routers", type=int, default=1,
                        help="stateless routers side by side on the one etcd (the router path's callers "
                             "spread over them)")
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--gen-procs", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                        help="load generator processes (default cores/4, at least 1)")
    parser.add_argument("--cache-models", type=int, default=0,
                        help="models a worker / the naive server keep (default: smallest Zipf mix / 10, <= 1000)")
    parser.add_argument("--equal-memory", action="store_true",
                        help="the fleet's workers together hold what the naive server holds: each keeps "
                             "--cache-models / --workers models")
    parser.add_argument("--artifacts", type=int, default=4, help="distinct models the tenants share")
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="writes bench.json and bench.png here")
    parser.add_argument("--json", type=Path, help="also write the records here")
    parser.add_argument("--keep", action="store_true", help="keep the run's temp dir (logs) and print its path")
    config.add_options(parser, config.ALLOCATOR)  # every server process of every path runs on it
    args = parser.parse_args(argv)
    try:
        args.allocator = allocator.resolve(args.allocator)
    except ModelfleetError as exc:
        parser.error(str(exc))
    quick = args.quick
    args.duration = args.duration if args.duration is not None else (1.0 if quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 0.5)
    args.mix_warmup = args.mix_warmup if args.mix_warmup is not None else (2.0 if quick else 30.0)
    args.concurrency = args.concurrency or ([8] if quick else [1, 8, 32])
    args.rows = args.rows or [1, 100]
    args.mixes = args.mixes or (["warm", "zipf10k"] if quick else list(MIX_TENANTS))
    for mix in args.mixes:
        if mix not in MIX_TENANTS:
            parser.error(f"unknown mix {mix!r}: choose from {', '.join(MIX_TENANTS)}")
    for path in args.paths:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}: choose from {', '.join(PATHS)}")
    if min(args.workers, args.routers, args.gen_procs, args.artifacts, args.max_tenants, args.rounds) < 1:
        parser.error("--workers, --routers, --gen-procs, --artifacts, --max-tenants and --rounds must be at least 1")
    if min(args.concurrency + args.rows) < 1:
        parser.error("--concurrency and --rows must be at least 1")
    if not args.duration > 0 or min(args.warmup, args.mix_warmup) < 0:
        parser.error("--duration must be above 0, --warmup and --mix-warmup at least 0")
    # Where the results go is checked now, not after minutes of measuring.
    for where, is_dir in ((args.out, True), (args.json, False)):
        if where is not None and where.exists() and where.is_dir() != is_dir:
            parser.error(f"{where} exists and is {'not ' if is_dir else ''}a directory")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark. Ctrl-C at any point (set-up, measuring, writing) stops every child
    process, removes the temp dir (unless --keep), says so in one line and exits 130."""
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="modelfleet-bench-"))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress on stderr
    try:
        return _run(args, root, log)
    except KeyboardInterrupt:  # the ExitStack in _run has stopped the processes and removed root
        log("interrupted: stopped the benchmark's processes and "
            + (f"kept its logs in {root}" if args.keep else "removed its temp dir"))
        raise SystemExit(130) from None


def _run(args: argparse.Namespace, root: Path, log) -> list[dict]:
    """The run, its processes held by one ExitStack: however it ends, they stop before root goes."""
    started = time.monotonic()
    os.environ[config.ALLOCATOR.env] = args.allocator  # inherited by workers, routers, naive server, bare proxy
    with ExitStack() as stack:  # callbacks run last-in first-out: servers stop before the dir goes
        stack.callback(lambda: args.keep or shutil.rmtree(root, ignore_errors=True))
        # spawned first: their start-up overlaps with the set-up
        gens = stack.enter_context(Generators(args.gen_procs))
        bench = Bench(args, root)
        stack.callback(bench.stop)
        try:
            bench.start(log)
        except Exception:  # not a signal or Ctrl-C: those leave nothing behind
            log(f"set-up failed; logs kept in {root}")
            args.keep = True
            raise
        records = run_cells(bench, gens, args, log)
    if args.keep:
        log(f"logs kept in {root}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_without_nan(records), indent=1)  # a cell with no answer has no percentile: null
    (args.out / "bench.json").write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print_table(records, args)
    print_figures(records)
    title = (f"modelfleet Predict paths ({os.cpu_count()} cores, {args.workers} worker(s), {args.routers} router(s), "
             f"{args.duration:g}s/cell, model {args.trees}x{args.leaves}, malloc {args.allocator})")
    plot(records, args.out / "bench.png", title)
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}"
        + (f" and {args.json}" if args.json else "") + f" in {time.monotonic() - started:.0f}s total")
    return records


if __name__ == "__main__":
    processes.exit_on_sigterm()  # temp dirs go on SIGTERM too
    processes.interrupt_once()  # a second Ctrl-C does not cut the clean-up short
    main()
