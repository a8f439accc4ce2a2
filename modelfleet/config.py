"""Every setting of modelfleet in one place: a command-line flag with an environment fallback.

Each `Option` names its flag, its `MODELFLEET_*` variable and its default. Commands pick the
options they need with `add_options`; a flag beats the variable, the variable beats the default.
The README's configuration table is this module, written out.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from modelfleet import procfs


def _default_home() -> Path:
    return Path(os.environ.get("MODELFLEET_HOME", Path.home() / ".modelfleet"))


def default_load_threads() -> int:
    """One per usable core (CPU affinity capped by a container's CPU limit), 4 to 16.

    A parse releases the GIL, so more loads run at once on more cores, until the GIL (the event
    loop plus each load's Python steps) is the limit. On 16 cores, one worker on a zipf10k cell
    with 32 callers: 1,244 rps, p99 60 ms with 16 threads against 1,017 rps, p99 117 ms with 4
    (one pair of `python -m loadtest.bench` runs; a second pair came out within that machine's
    run-to-run noise, so read it as "no worse, often better").
    """
    return max(4, min(16, procfs.usable_cores()))


@dataclass(frozen=True)
class Option:
    flag: str
    env: str
    default: Any
    type: Callable[[str], Any]
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def raw_env(self) -> str | None:
        raw = os.environ.get(self.env)
        return raw if raw else None

    def parse(self, text: str) -> Any:
        """`type(text)`, with any failure as one ArgumentTypeError that names the flag and variable."""
        try:
            return self.type(text)
        except (ValueError, TypeError, OverflowError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"{exc or 'invalid value'} (flag {self.flag} or {self.env})") from None

    def resolve_default(self) -> Any:
        """The variable's value if set, else the default. A bad variable is a ValueError naming it."""
        raw = self.raw_env()
        if raw is None:
            return self.default() if callable(self.default) else self.default
        try:
            return self.parse(raw)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{self.env}={raw!r}: {exc}") from None


def _finite(text: str) -> float:
    value = float(str(text).strip())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A flag type: an integer >= `minimum` (and <= `maximum`); anything else is a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {text!r}")
        return value

    parse.__name__ = "whole"
    return parse


def number(minimum: float = 0.0, above: bool = False) -> Callable[[str], float]:
    """A flag type: a finite number >= `minimum` (> with `above`); NaN and infinities are refused."""

    def parse(text: str) -> float:
        try:
            value = _finite(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if above else '>='} {minimum:g}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


port = whole(0, 65535)
positive_seconds = number(0.0, above=True)


def one_line(max_chars: int) -> Callable[[str], str]:
    """A flag type: printable text on one line, 1 to `max_chars` characters once stripped. For
    notes an operator leaves in etcd (a drain's reason): shown in tables and logs, where a newline
    or a control character would forge or break a line, and kept in every read of the fleet."""

    def parse(text: str) -> str:
        value = str(text).strip()
        if not value:
            raise argparse.ArgumentTypeError("expected some text, got an empty string")
        if len(value) > max_chars:
            raise argparse.ArgumentTypeError(f"expected at most {max_chars} characters, got {len(value)}")
        if not value.isprintable():
            raise argparse.ArgumentTypeError(f"expected printable text on one line, got {value[:40]!r}")
        return value

    parse.__name__ = "one_line"
    return parse


def boolean(text: str) -> bool:
    """1/0, true/false, yes/no, on/off in any case; anything else is refused, never read as off
    (a misspelt `MODELFLEET_AUTH=enabled` must not turn authentication off)."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


MAX_BYTE_SIZE = (1 << 63) - 1  # what the Stats reply (int64) and every counter can carry


def byte_size(text: str) -> int:
    """Parses '512MiB', '2GiB', '1000000' into bytes; negative, NaN, infinite and sizes over
    MAX_BYTE_SIZE are refused. Whole numbers are read exactly (not through a float)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = str(text).strip().lower()
    scale = 1
    for suffix, unit in units.items():
        if lowered.endswith(suffix):
            lowered, scale = lowered[: -len(suffix)], unit
            break
    try:
        value = int(lowered.strip()) * scale if lowered.strip().lstrip("+-").isdigit() else _finite(lowered) * scale
    except ValueError:
        raise ValueError(f"expected a byte size like 512MiB, 2GiB or 1000000, got {text!r}") from None
    if value < 0:
        raise ValueError(f"expected a byte size >= 0, got {text!r}")
    if value > MAX_BYTE_SIZE:
        raise ValueError(f"expected a byte size of at most {MAX_BYTE_SIZE} (8 EiB), got {text!r}")
    return int(value)


def positive_byte_size(text: str) -> int:
    """A byte size of at least one byte (a budget of nothing holds no model)."""
    value = byte_size(text)
    if value < 1:
        raise ValueError(f"expected a byte size > 0, got {text!r}")
    return value


# -- shared by every component ----------------------------------------------------------------
ETCD = Option("--etcd", "MODELFLEET_ETCD", "127.0.0.1:2379", str,
              "etcd endpoint host:port (comma-separated list for a cluster)")
PREFIX = Option("--prefix", "MODELFLEET_PREFIX", "/modelfleet/v1", str,
                "etcd key prefix; fleets sharing one etcd use different prefixes")
STORE = Option("--store", "MODELFLEET_STORE", lambda: str(_default_home() / "store"), str,
               "model store: a directory, file://PATH or s3://BUCKET[/PREFIX] (content-addressed artifacts)")
STORE_CACHE_DIR = Option("--store-cache-dir", "MODELFLEET_STORE_CACHE_DIR", lambda: str(_default_home() / "store-cache"),
                         str, "worker's disk cache of artifacts from a remote (s3://) store ('' = none)")
STORE_CACHE_BYTES = Option("--store-cache-bytes", "MODELFLEET_STORE_CACHE_BYTES", 4 << 30, byte_size,
                           "byte bound of that disk cache (e.g. 512MiB, 4GiB; 0 = no cache)")
S3_ENDPOINT = Option("--s3-endpoint", "MODELFLEET_S3_ENDPOINT", "", str,
                     "S3-compatible endpoint http(s)://host:port ('' = AWS); credentials from the AWS_* variables")
HOST = Option("--host", "MODELFLEET_HOST", "127.0.0.1", str, "address to listen on")


def one_of(*choices: str) -> Callable[[str], str]:
    """A flag type that takes one of `choices`, in any case; anything else is a usage error."""
    expected = " or ".join(repr(choice) for choice in choices)

    def parse(text: str) -> str:
        lowered = str(text).strip().lower()
        if lowered not in choices:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return lowered

    return parse


LOG_FORMAT = Option("--log-format", "MODELFLEET_LOG_FORMAT", "text", one_of("text", "json"),
                    "log lines as 'text' (key=value) or 'json'")
LOG_LEVEL = Option("--log-level", "MODELFLEET_LOG_LEVEL", "info", one_of("debug", "info", "warning", "error"),
                   "debug, info, warning or error")
event_loop_name = one_of("uvloop", "asyncio")
EVENT_LOOP = Option("--event-loop", "MODELFLEET_EVENT_LOOP", "uvloop", event_loop_name,
                    "event loop of a router or worker: 'uvloop' (libuv; ~50 µs less CPU per request in each "
                    "process) or 'asyncio' (the standard library's)")
ALLOCATOR = Option("--allocator", "MODELFLEET_ALLOCATOR", "auto", one_of("auto", "jemalloc", "system"),
                   "malloc of a router or worker: 'auto' (jemalloc where the system has it, e.g. Debian's "
                   "libjemalloc2; else the C library's), 'jemalloc' (refuse to start without it) or 'system' "
                   "(modelfleet.allocator)")

# -- security ---------------------------------------------------------------------------------
TLS_CERT = Option("--tls-cert", "MODELFLEET_TLS_CERT", "", str,
                  "PEM certificate this process presents (serving, and as a client under mutual TLS)")
TLS_KEY = Option("--tls-key", "MODELFLEET_TLS_KEY", "", str, "PEM private key of --tls-cert")
TLS_CLIENT_CA = Option("--tls-client-ca", "MODELFLEET_TLS_CLIENT_CA", "", str,
                       "serve mutual TLS: demand client certificates signed by this CA")
TLS_CA = Option("--tls-ca", "MODELFLEET_TLS_CA", "", str,
                "CA that signs the servers this process calls (router -> worker, CLI -> router)")
AUTH = Option("--auth", "MODELFLEET_AUTH", False, boolean,
              "require an API key (metadata x-api-key) on every Predict, bound to its tenants (1/0)")
API_KEY = Option("--api-key", "MODELFLEET_API_KEY", "", str, "API key sent by `predict`")
ETCD_USER = Option("--etcd-user", "MODELFLEET_ETCD_USER", "", str, "etcd user (etcd auth enabled)")
ETCD_PASSWORD = Option("--etcd-password", "MODELFLEET_ETCD_PASSWORD", "", str, "its password (prefer the variable)")
ETCD_CA = Option("--etcd-ca", "MODELFLEET_ETCD_CA", "", str, "CA of etcd's TLS certificate (https etcd)")
ETCD_CERT = Option("--etcd-cert", "MODELFLEET_ETCD_CERT", "", str, "client certificate for etcd (mutual TLS)")
ETCD_KEY = Option("--etcd-key", "MODELFLEET_ETCD_KEY", "", str, "its key")

# -- observability ----------------------------------------------------------------------------
METRICS_PORT = Option("--metrics-port", "MODELFLEET_METRICS_PORT", 0, port,
                      "Prometheus metrics on this HTTP port (0 = off)")
TRACE_FILE = Option("--trace-file", "MODELFLEET_TRACE_FILE", "", str,
                    "append finished OpenTelemetry spans to this file as JSON lines ('' = off)")
OTLP_ENDPOINT = Option("--otlp-endpoint", "MODELFLEET_OTLP_ENDPOINT", "", str,
                       "send OpenTelemetry spans to this collector over OTLP/gRPC: http://host:4317 (or host:port) "
                       "plaintext, https://... TLS ('' = off)")


def fraction(text: str) -> float:
    """A ratio in [0, 1]: '0.05', '1'."""
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


TRACE_SAMPLE = Option("--trace-sample", "MODELFLEET_TRACE_SAMPLE", 1.0, fraction,
                      "fraction of new traces recorded while tracing is on; a caller's traceparent decides "
                      "for its own trace")
TRACING_OPTIONS = (TRACE_FILE, OTLP_ENDPOINT, TRACE_SAMPLE)

# -- router -----------------------------------------------------------------------------------
ROUTER_PORT = Option("--port", "MODELFLEET_ROUTER_PORT", 50051, port, "router gRPC port (0 = any free port)")
SHARD_SIZE = Option("--shard-size", "MODELFLEET_SHARD_SIZE", 2, whole(1),
                    "workers per tenant shard when the tenant's route names none")
# The admin commands' view of the same setting: by default what the live routers publish.
FLEET_SHARD_SIZE = Option("--shard-size", "MODELFLEET_SHARD_SIZE", None, whole(1),
                          "workers per tenant shard when the tenant's route names none (default: what the "
                          "routers run with; 2 when none is up)")
SPILL_INFLIGHT = Option("--spill-inflight", "MODELFLEET_SPILL_INFLIGHT", 32, whole(1),
                        "requests in flight on a tenant's first shard member before the next member takes more")
ROUTER_ID = Option("--router-id", "MODELFLEET_ROUTER_ID", "", str,
                   "stable router identity (default: router-<host>-<port>)")
SHADOW_BUDGET = Option("--shadow-budget", "MODELFLEET_SHADOW_BUDGET", 16, whole(0),
                       "shadow copies in flight per router; more are dropped (and counted), never queued")
worker_transport = one_of("stream", "unary")  # router.worker_stream
WORKER_TRANSPORT = Option("--worker-transport", "MODELFLEET_WORKER_TRANSPORT", "stream", worker_transport,
                          "how a router's Predicts reach workers: 'stream' (frames on one long-lived call per "
                          "worker: ~200-300 µs less CPU per request, router and worker together) or 'unary' "
                          "(a call each)")
DEFAULT_DEADLINE = Option("--default-deadline", "MODELFLEET_DEFAULT_DEADLINE", 5.0, positive_seconds,
                          "seconds a Predict may take when the caller sets no deadline")
DRAIN_SECONDS = Option("--drain-seconds", "MODELFLEET_DRAIN_SECONDS", 3.0, number(0.0),
                       "on SIGTERM, after NOT_SERVING, at most this long a router keeps answering until callers "
                       "have been quiet for 0.2 s, before it stops (0 = stop at once)")


def hedge_delay(text: str) -> float | str:
    """'0' (off), a delay in milliseconds ('25', '7.5'), or 'auto' (the observed p95)."""
    lowered = str(text).strip().lower()
    if lowered == "auto":
        return "auto"
    try:
        value = _finite(lowered)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"hedge delay must be 'auto' or finite milliseconds >= 0, got {text!r}")
    return value


HEDGE_AFTER_MS = Option("--hedge-after-ms", "MODELFLEET_HEDGE_AFTER_MS", 0.0, hedge_delay,
                        "send a hedge to the next shard member when no answer came within this many ms; "
                        "0 = off, 'auto' = the p95 of this router's recent successful attempts (bounded)")
EJECT_AFTER_FAILURES = Option("--eject-after-failures", "MODELFLEET_EJECT_AFTER_FAILURES", 3, whole(0),
                              "consecutive failures or attempt timeouts before a worker is skipped for a "
                              "back-off (0 = never eject)")
EJECT_BACKOFF_S = Option("--eject-backoff", "MODELFLEET_EJECT_BACKOFF", 1.0, positive_seconds,
                         "seconds an ejected worker is first skipped; doubles on each failed probe")
EJECT_MAX_BACKOFF_S = Option("--eject-max-backoff", "MODELFLEET_EJECT_MAX_BACKOFF", 30.0, positive_seconds,
                             "upper bound of the ejection back-off, seconds")
TENANT_RATE_LIMIT = Option("--tenant-rate-limit", "MODELFLEET_TENANT_RATE_LIMIT", 10_000.0, number(0.0),
                           "requests per second per tenant on each router when the route sets none (0 = no limit)")
TENANT_BURST = Option("--tenant-burst", "MODELFLEET_TENANT_BURST", 0.0, number(0.0),
                      "token-bucket size per tenant when the route sets none (0 = one second of the rate)")
TENANT_MAX_INFLIGHT = Option("--tenant-max-inflight", "MODELFLEET_TENANT_MAX_INFLIGHT", 1024, whole(0),
                             "requests of one tenant in flight on each router when the route sets none (0 = no limit)")
ROUTER_RESILIENCE_OPTIONS = (HEDGE_AFTER_MS, EJECT_AFTER_FAILURES, EJECT_BACKOFF_S, EJECT_MAX_BACKOFF_S,
                             TENANT_RATE_LIMIT, TENANT_BURST, TENANT_MAX_INFLIGHT)

# -- worker -----------------------------------------------------------------------------------
WORKER_PORT = Option("--port", "MODELFLEET_WORKER_PORT", 0, port, "worker gRPC port (0 = any free port)")
WORKER_ID = Option("--worker-id", "MODELFLEET_WORKER_ID", "", str,
                   "stable worker identity, [A-Za-z0-9._-]{1,128} (default: worker-<host>-<port>)")
ZONE = Option("--zone", "MODELFLEET_ZONE", "default", str, "failure zone of this worker")
ADVERTISE_HOST = Option("--advertise-host", "MODELFLEET_ADVERTISE_HOST", "127.0.0.1", str,
                        "host others use to reach this process (routers dial workers, tools dial routers)")
CACHE_BYTES = Option("--cache-bytes", "MODELFLEET_CACHE_BYTES", 1 << 30, positive_byte_size,
                     "byte budget of the worker's model cache (e.g. 512MiB, 2GiB)")
LOAD_THREADS = Option("--load-threads", "MODELFLEET_LOAD_THREADS", default_load_threads, whole(1),
                      "threads that load models (default: one per usable core, 4 to 16)")
# Downloads at once: as many fetch threads as the S3 client has connections (worker.server sizes
# both from this), so a download never waits for a connection, and enough that a store hung on a
# handful of artifacts does not hold up the downloads of the others.
FETCH_THREADS = Option("--fetch-threads", "MODELFLEET_FETCH_THREADS", 16, whole(1),
                       "threads that download models from a remote store, apart from the load threads; also the "
                       "S3 client's connection pool")
LEASE_TTL = Option("--lease-ttl", "MODELFLEET_LEASE_TTL", 10, whole(2),
                   "seconds a dead worker stays in membership before its etcd lease expires")
MAX_QUEUED_LOADS = Option("--max-queued-loads", "MODELFLEET_MAX_QUEUED_LOADS", 256, whole(0),
                          "requests that may wait for model loads at once; more get RESOURCE_EXHAUSTED with a "
                          "retry hint (0 = no bound)")
WORKER_RESILIENCE_OPTIONS = (MAX_QUEUED_LOADS,)

WARM_ON_JOIN = Option("--warm-on-join", "MODELFLEET_WARM_ON_JOIN", True, boolean,
                      "a joining worker loads the active tenants it is about to own before it takes traffic (1/0)")
WARM_ACTIVE_MINUTES = Option("--warm-active-minutes", "MODELFLEET_WARM_ACTIVE_MINUTES", 10.0, number(0.0),
                             "make-before-break warms tenants active within this many minutes")
WARM_JOIN_BUDGET = Option("--warm-join-budget", "MODELFLEET_WARM_JOIN_BUDGET", 60.0, number(0.0),
                          "seconds a joining worker may spend warming before it goes live regardless (the rest load "
                          "on demand); it also stops once 3 warm-ups in a row could not reach the model store")
WARM_TIMEOUT = Option("--warm-timeout", "MODELFLEET_WARM_TIMEOUT", 30.0, positive_seconds,
                      "seconds one make-before-break warm-up (a model load on one worker) may take; a worker that "
                      "does not answer in time counts as unreachable, and the change is not committed")

# -- demo fleet -------------------------------------------------------------------------------
UP_WORKERS = Option("--workers", "MODELFLEET_UP_WORKERS", 3, whole(1), "worker processes in the demo fleet")
UP_DEMO_TENANTS = Option("--demo-tenants", "MODELFLEET_UP_DEMO_TENANTS", 50, whole(1), "demo tenants to register")

# -- client commands --------------------------------------------------------------------------
ROUTER_ADDRESS = Option("--router", "MODELFLEET_ROUTER", "127.0.0.1:50051", str, "router address for `predict`")
GC_TOMBSTONE_DAYS = Option("--tombstone-days", "MODELFLEET_GC_TOMBSTONE_DAYS", 7.0, number(0.0, above=True),
                           "gc removes the tombstones of versions it removed longer ago than this many days (the "
                           "names are then free again); keep it far above etcd's compaction retention")
# 2 s: what `status` gave each member when it asked them one by one; an answer is a few counters.
MEMBERS_TIMEOUT = Option("--members-timeout", "MODELFLEET_MEMBERS_TIMEOUT", 2.0, positive_seconds,
                         "seconds `status` and `rollout --status` wait for the workers and routers they ask, all "
                         "asked at once; those that have not answered by then are named as unanswered")

# What `modelfleet router` and `modelfleet worker` read. Here, not beside the servers, so the
# command line can declare them without importing a server (and LightGBM with the worker's).
ROUTER_OPTIONS = (ETCD, PREFIX, HOST, EVENT_LOOP, ALLOCATOR, ROUTER_PORT, ROUTER_ID, ADVERTISE_HOST, SHARD_SIZE,
                  SPILL_INFLIGHT, WORKER_TRANSPORT, DEFAULT_DEADLINE, DRAIN_SECONDS, SHADOW_BUDGET, LEASE_TTL, AUTH, TLS_CERT, TLS_KEY,
                  TLS_CLIENT_CA, TLS_CA, METRICS_PORT, *ROUTER_RESILIENCE_OPTIONS, *TRACING_OPTIONS)
WORKER_OPTIONS = (ETCD, PREFIX, STORE, STORE_CACHE_DIR, STORE_CACHE_BYTES, S3_ENDPOINT, HOST, EVENT_LOOP, ALLOCATOR,
                  WORKER_PORT, WORKER_ID, ZONE, ADVERTISE_HOST, CACHE_BYTES, LOAD_THREADS, FETCH_THREADS, LEASE_TTL,
                  SHARD_SIZE, WARM_ON_JOIN, WARM_ACTIVE_MINUTES, WARM_JOIN_BUDGET, TLS_CERT, TLS_KEY, TLS_CLIENT_CA,
                  TLS_CA, METRICS_PORT, *WORKER_RESILIENCE_OPTIONS, *TRACING_OPTIONS)

ALL_OPTIONS: tuple[Option, ...] = (
    ETCD, PREFIX, STORE, STORE_CACHE_DIR, STORE_CACHE_BYTES, S3_ENDPOINT, LOG_FORMAT, LOG_LEVEL, HOST, EVENT_LOOP,
    ALLOCATOR, ROUTER_PORT, ROUTER_ID, SHARD_SIZE, SPILL_INFLIGHT, WORKER_TRANSPORT,
    SHADOW_BUDGET, DEFAULT_DEADLINE, DRAIN_SECONDS, WORKER_PORT, WORKER_ID, ZONE, ADVERTISE_HOST, CACHE_BYTES, LOAD_THREADS,
    FETCH_THREADS, LEASE_TTL, TLS_CERT, TLS_KEY, TLS_CLIENT_CA, TLS_CA, AUTH, API_KEY, ETCD_USER, ETCD_PASSWORD,
    ETCD_CA, ETCD_CERT, ETCD_KEY, METRICS_PORT, WARM_ON_JOIN, WARM_ACTIVE_MINUTES, WARM_JOIN_BUDGET, WARM_TIMEOUT,
    UP_WORKERS, UP_DEMO_TENANTS, ROUTER_ADDRESS, GC_TOMBSTONE_DAYS, MEMBERS_TIMEOUT,
    *ROUTER_RESILIENCE_OPTIONS, *WORKER_RESILIENCE_OPTIONS, *TRACING_OPTIONS,
)


def add_options(parser: argparse.ArgumentParser, *options: Option) -> None:
    """Adds each option as a flag whose default comes from its environment variable."""
    for opt in options:
        # A variable's raw text is the default, so argparse converts it only for the command that
        # runs, and a bad one is a usage error naming the variable, not a traceback from every command.
        raw = opt.raw_env()
        default = raw if raw is not None else (opt.default() if callable(opt.default) else opt.default)
        parser.add_argument(opt.flag, dest=opt.dest, type=opt.parse, default=default,
                            help=f"{opt.help} [env {opt.env}]")


def etcd_endpoints(spec: str) -> list[tuple[str, int]]:
    """'h1:2379,h2:2379' -> [('h1', 2379), ('h2', 2379)]."""
    endpoints = []
    for part in spec.split(","):
        part = part.strip().removeprefix("http://").removeprefix("https://")
        host, _, number_text = part.rpartition(":")
        try:
            if not host:
                raise argparse.ArgumentTypeError("no host")
            endpoints.append((host, port(number_text)))
        except argparse.ArgumentTypeError:
            raise ValueError(f"bad etcd endpoint {part!r}: expected host:port with a port from 0 to 65535") from None
    return endpoints
