"""OpenTelemetry tracing, off unless asked for: spans route -> forward (router), predict -> load
(worker), one trace per request across processes (W3C `traceparent` in gRPC metadata).

`--trace-file PATH` writes finished spans as JSON lines (debugging, tests); `--otlp-endpoint`
sends them to an OpenTelemetry collector when the OTLP exporter package is installed. With
neither, no tracer exists and every hook here is a no-op costing one `is None` check.
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterator

import grpc

_tracer = None


def setup(service: str, trace_file: str = "", otlp_endpoint: str = "") -> bool:
    """Installs a tracer provider for this process; False (and nothing installed) when off."""
    global _tracer
    if not trace_file and not otlp_endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if trace_file:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out = open(trace_file, "a", buffering=1)
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
            out=out, formatter=lambda span: json.dumps(json.loads(span.to_json())) + "\n")))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise SystemExit("error: --otlp-endpoint needs opentelemetry-exporter-otlp-proto-grpc installed") from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("modelfleet")
    return True


@contextlib.contextmanager
def span(name: str, **attributes) -> Iterator[None]:
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes={k: str(v) for k, v in attributes.items()}):
        yield


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata for a downstream call (empty when off)."""
    if _tracer is None:
        return ()
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple(carrier.items())


class ServerTracing(grpc.aio.ServerInterceptor):
    """Continues the caller's trace (if any) in a span around each unary RPC."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if _tracer is None or handler is None or handler.unary_unary is None or details.method.startswith("/grpc."):
            return handler
        from opentelemetry.propagate import extract

        carrier = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        parent = extract(carrier)
        name = f"{self.prefix}.{details.method.rsplit('/', 1)[-1].lower()}"
        inner = handler.unary_unary

        async def traced(request, context):
            with _tracer.start_as_current_span(name, context=parent) as current:
                tenant = getattr(request, "tenant_id", None) or getattr(request, "model_name", None)
                if tenant:
                    current.set_attribute("modelfleet.tenant", tenant)
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(traced, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
