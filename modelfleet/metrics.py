"""Prometheus metrics for routers and workers, on their own HTTP port (`--metrics-port`).

Two kinds, so the request path pays almost nothing:
- a wrapper registered around each servicer times every RPC and counts it by method and
  status, and counts requests per tenant in a plain dict (exported only for the top-K busiest
  tenants: bounded cardinality);
- collectors read counters the components already keep (cache, failover, routing cache) at
  scrape time, so those cost nothing per request.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from modelfleet.errors import FailedPrecondition
from modelfleet.servicer_wrap import UnaryMethod, unary_methods, wrap_methods
from version_service.schema import is_valid_id

TOP_TENANTS = 20
INVALID_TENANT = "(invalid)"  # the tenant label of requests whose tenant id breaks the id rule
_TENANT_TABLE_LIMIT = 50_000  # beyond this many distinct tenants, keep only the busiest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RpcMetrics:
    """modelfleet_rpc_requests_total{method,code}, modelfleet_rpc_seconds{method}, top-K tenants.

    Installed per servicer at registration (`measured`), not as a server interceptor
    (modelfleet.servicer_wrap says why). Register the measured stand-in outermost, around any
    other wrapper (the router's API-key check), so refused calls are counted too."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        self.counts: Counter = Counter()  # (method, code) -> n
        self.tenants: Counter = Counter()
        self.seconds = Histogram("modelfleet_rpc_seconds", "RPC latency in seconds", ["component", "method"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.component = component
        registry.register(_Collector(self._collect))

    def measured(self, servicer: Any, service: ServiceDescriptor) -> Any:
        """What to register in place of `servicer`: every unary method of `service` timed and
        counted."""
        return wrap_methods(servicer, unary_methods(service), self._measured)

    def _measured(self, method: str, inner: UnaryMethod) -> UnaryMethod:
        counts, tenants = self.counts, self.tenants
        observe = self.seconds.labels(self.component, method).observe

        async def measured(request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except asyncio.CancelledError:  # the caller went away: gRPC sets no code, the caller sees CANCELLED
                code = "CANCELLED"
                raise
            except BaseException:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                observe(time.perf_counter() - started)
                counts[(method, code)] += 1
                tenant = getattr(request, "tenant_id", None) or getattr(request, "model_name", None)
                if tenant:
                    # before validation: a malformed id (up to the message size limit) is no label;
                    # one counted already passed this check (the table holds only valid ids)
                    if tenant not in tenants and not is_valid_id(tenant):
                        tenant = INVALID_TENANT
                    tenants[tenant] += 1
                    if len(tenants) > _TENANT_TABLE_LIMIT:
                        keep = tenants.most_common(_TENANT_TABLE_LIMIT // 10)
                        tenants.clear()
                        tenants.update(dict(keep))

        return measured

    def _collect(self):
        requests = CounterMetricFamily("modelfleet_rpc_requests", "RPCs by method and status code",
                                       labels=["component", "method", "code"])
        for (method, code), n in sorted(self.counts.items()):
            requests.add_metric([self.component, method, code], n)
        busiest = CounterMetricFamily("modelfleet_tenant_requests",
                                      f"requests of the {TOP_TENANTS} busiest tenants (bounded cardinality)",
                                      labels=["component", "tenant"])
        for tenant, n in self.tenants.most_common(TOP_TENANTS):
            busiest.add_metric([self.component, tenant], n)
        return [requests, busiest]


def load_histogram(registry: CollectorRegistry) -> Histogram:
    """modelfleet_worker_model_load_seconds: a worker's successful model loads (etcd record, store
    read, verify, parse), queueing for a load thread excluded. Failed loads are counted in
    modelfleet_worker_cache_events_total{kind="load_failure"} instead."""
    return Histogram("modelfleet_worker_model_load_seconds", "seconds each successful model load took",
                     buckets=LOAD_BUCKETS, registry=registry)


class _Collector:
    def __init__(self, collect: Callable[[], Iterable]) -> None:
        self.collect = collect


def counters(registry: CollectorRegistry, name: str, doc: str, read: Callable[[], Mapping[str, float]],
             label: str = "kind") -> None:
    """Exports a dict of monotonically increasing counts as one counter family, read at scrape."""
    def collect():
        family = CounterMetricFamily(name, doc, labels=[label])
        for key, value in sorted(read().items()):
            family.add_metric([key], value)
        return [family]

    registry.register(_Collector(collect))


def gauges(registry: CollectorRegistry, read: Callable[[], Mapping[str, tuple[str, float]]]) -> None:
    """Exports name -> (help, value) gauges, read at scrape."""
    def collect():
        return [GaugeMetricFamily(name, doc, value=value) for name, (doc, value) in sorted(read().items())]

    registry.register(_Collector(collect))


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Starts the HTTP exposition server; returns its port (0 = off)."""
    if not port:
        return 0
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise FailedPrecondition(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return server.server_port
