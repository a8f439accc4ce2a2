"""OpenTelemetry tracing across router and worker: off unless asked for, and free when off.

One trace per request, across processes, carried by the W3C `traceparent` in gRPC metadata:

    router  Predict (server span; continues the caller's traceparent when it sends one)
              ├─ route      version lookup + shard choice (tenant, version, shard members)
              └─ forward    one per attempt to a worker (worker, attempt, hedge, status code);
                   │        its context travels to the worker as `traceparent`
    worker        predict   (server span; tenant, version, rows, cache hit or miss)
                    └─ load the model load this request triggered (bytes, parse and load seconds)

Off (no --trace-file, no --otlp-endpoint) nothing is installed: no wrapper, no tracer, and
the request path pays one `is None` test per hook. That is the contract the hooks keep: each
caller reads `tracer()` once when it is built (or per model load, which is not the hot path)
and branches on None, so the Predict path neither imports nor calls OpenTelemetry.

Exporters: `--trace-file PATH` appends finished spans as compact JSON lines (one per span:
name, ids, parent, times, status, attributes, the process's service) through a batch processor
that writes within EXPORT_DELAY_MS; `--otlp-endpoint` sends them to an OpenTelemetry collector
over OTLP/gRPC. `shutdown()` flushes both (the router and worker call it on SIGTERM).
`--trace-sample` records that fraction of new traces; a caller's traceparent decides for its own.
"""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Sequence

import grpc

from modelfleet.servicer_wrap import wrap_methods

_tracer = None  # opentelemetry Tracer while tracing is on, else None
_provider = None
_api = None  # the OpenTelemetry names the hooks use, imported by setup() (never while off)

EXPORT_DELAY_MS = 200  # a finished span reaches the file (or collector) within about this long
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


def setup(service: str, instance_id: str, trace_file: str = "", otlp_endpoint: str = "",
          sample: float = 1.0) -> bool:
    """Installs this process's tracer (service.name = service, service.instance.id = instance_id).

    Returns False, installing nothing, when neither exporter is asked for. Called once per
    process, after the component knows its id and before it builds its servicers.
    """
    global _tracer, _provider, _api
    if not trace_file and not otlp_endpoint:
        return False
    if not 0.0 <= sample <= 1.0:
        raise SystemExit("error: --trace-sample must be between 0 and 1")
    from opentelemetry.trace import SpanKind, Status, StatusCode, get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.instance.id": instance_id}),
                              sampler=ParentBased(TraceIdRatioBased(sample)))
    if trace_file:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(trace_file),
                                                       schedule_delay_millis=EXPORT_DELAY_MS))
    if otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint),
                                                       schedule_delay_millis=EXPORT_DELAY_MS))
    _api = SimpleNamespace(SpanKind=SpanKind, Status=Status, StatusCode=StatusCode, get_current_span=get_current_span,
                           propagator=TraceContextTextMapPropagator())
    _provider = provider
    _tracer = provider.get_tracer("modelfleet")
    return True


def setup_from_args(args: Any, service: str, instance_id: str) -> bool:
    """setup() from the parsed --trace-file / --otlp-endpoint / --trace-sample."""
    return setup(service, instance_id, getattr(args, "trace_file", ""), getattr(args, "otlp_endpoint", ""),
                 getattr(args, "trace_sample", 1.0))


def tracer():
    """The process's tracer, or None while tracing is off (the one test every hook makes)."""
    return _tracer


def shutdown() -> None:
    """Flushes every finished span and stops the exporters (process exit)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _otlp_exporter(endpoint: str):
    """OTLP/gRPC to a collector: `http://host:4317` (or bare host:port) plaintext, `https://` TLS."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # an install without the optional exporter package
        raise SystemExit("error: --otlp-endpoint needs the opentelemetry-exporter-otlp-proto-grpc package") from exc
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return OTLPSpanExporter(endpoint=endpoint)


# -- export to a file ---------------------------------------------------------------------------
class JsonLinesExporter:
    """Appends each finished span as one compact JSON object per line (the SDK's SpanExporter
    interface: export, force_flush, shutdown).

    Ids are lowercase hex as in `traceparent`; `parent_span_id` is null for a root span; times
    are nanoseconds since the epoch. Written by the batch processor's thread, flushed per batch.
    """

    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"error: --trace-file {path}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]):
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(span_record(span), separators=(",", ":"), default=str) + "\n" for span in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def span_record(span: Any) -> dict[str, Any]:
    """A finished SDK span as a plain dict (what JsonLinesExporter writes)."""
    context, parent = span.context, span.parent
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events],
        "service": span.resource.attributes.get("service.name"),
        "instance": span.resource.attributes.get("service.instance.id"),
    }


# -- propagation over gRPC metadata ---------------------------------------------------------------
def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None):
    """The OpenTelemetry context a caller's `traceparent` (and `tracestate`) names; empty if none."""
    carrier = {key: value for key, value in metadata or () if key in (TRACEPARENT, TRACESTATE)
               and isinstance(value, str)}
    return _api.propagator.extract(carrier)


def metadata_for(span) -> tuple[tuple[str, str], ...]:
    """`traceparent` (and `tracestate`) naming `span`, as gRPC metadata for a downstream call.

    Written directly (W3C trace context, version 00) rather than through the propagator: this
    runs once per attempt, and an unsampled span still sends its flags so the worker drops too.
    """
    context = span.get_span_context()
    parent = ((TRACEPARENT, f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"),)
    state = context.trace_state
    return parent + ((TRACESTATE, state.to_header()),) if state else parent


# -- spans the components open ------------------------------------------------------------------
def start_forward(tracer, worker_id: str, attempt: int, hedge: bool):
    """(span, metadata) for one attempt of a forward: a child of the current (Predict) span."""
    span = tracer.start_span("forward", kind=_api.SpanKind.CLIENT, attributes={
        "modelfleet.worker": worker_id, "modelfleet.attempt": attempt, "modelfleet.hedge": hedge})
    return span, metadata_for(span)


def end_forward(span, code: str, outcome: str = "") -> None:
    """Ends an attempt's span with its gRPC status code name (OK, UNAVAILABLE, CANCELLED, ...)."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code)
        if outcome:
            span.set_attribute("modelfleet.outcome", outcome)
        if code != "OK" and outcome != "lost":
            span.set_status(_api.Status(_api.StatusCode.ERROR, code))
    span.end()


def set_attributes(span, attributes: Mapping[str, Any]) -> None:
    """Sets modelfleet.* attributes on a span (keys without the prefix)."""
    for key, value in attributes.items():
        span.set_attribute(f"modelfleet.{key}", value)


def current_span():
    return _api.get_current_span()


def traced(servicer: Any, spans: Mapping[str, str]) -> Any:
    """What to register in place of `servicer`: the same object while tracing is off; else a
    stand-in (modelfleet.servicer_wrap) whose methods named in `spans` ({"Predict": "predict"})
    each run in a server span that continues the caller's traceparent.

    Nothing at all is installed while tracing is off, and only the named methods are touched
    (health, reflection and admin RPCs never), so each RPC is one server span.
    """
    if _tracer is None:
        return servicer
    return wrap_methods(servicer, spans, lambda method, inner: _server_span(inner, spans[method]))


def _server_span(inner: Any, name: str) -> Any:
    tracer, api = _tracer, _api

    async def traced_method(request, context: grpc.aio.ServicerContext):
        parent = context_from_metadata(context.invocation_metadata())
        with tracer.start_as_current_span(name, context=parent, kind=api.SpanKind.SERVER,
                                          record_exception=False, set_status_on_exception=False) as span:
            if not span.is_recording():  # sampled out: the context still travels on, nothing else
                return await inner(request, context)
            tenant = getattr(request, "tenant_id", None) or getattr(request, "model_name", None)
            if tenant:
                span.set_attribute("modelfleet.tenant", tenant)
            try:
                response = await inner(request, context)
            except BaseException:
                code = context.code()
                code = code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"
                span.set_attribute("rpc.grpc.status_code", code)
                span.set_status(api.Status(api.StatusCode.ERROR, str(context.details() or code)))
                raise
            span.set_attribute("rpc.grpc.status_code", "OK")
            return response

    return traced_method
