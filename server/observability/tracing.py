"""OpenTelemetry traces, off (no work at all) unless an OTLP endpoint is configured.

With `--otlp-endpoint`, spans go over OTLP/gRPC through a batch processor:

- one SERVER span per RPC (`rpc.system=grpc`, `rpc.service`, `rpc.method`,
  `rpc.grpc.status_code`), continuing the caller's W3C `traceparent`
  (Envoy's own span when Envoy traces too: `flowport up` configures Envoy's
  OpenTelemetry tracer with the same endpoint);
- one span per execution (`flowport.execution_id`, `flowport.workflow_id`,
  the tenant, the final state), a child of the RPC that created it;
- one span per node attempt, a child of its execution's;
- one CLIENT span per webhook delivery attempt and per outgoing HTTP call
  (the request carries `traceparent`), and per SQL statement a node runs.

Every hook first checks `enabled()`: with tracing off a call costs one
module-global read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import TracerProvider

    from flowport.server.settings import Settings

# OpenTelemetry is imported only once tracing is installed: a process that
# does not trace does not load it.
Kind = Literal["server", "client", "internal"]
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_propagator: Any = None


def enabled() -> bool:
    """Whether spans are being made."""
    return _tracer is not None


def install(provider: TracerProvider | None) -> None:
    """Make spans with `provider` (None: stop making them)."""
    global _tracer, _provider, _propagator  # noqa: PLW0603 - one tracer per process, like OpenTelemetry's global
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _provider = provider
    _propagator = TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("flowport") if provider is not None else None


def setup(settings: Settings) -> TracerProvider | None:
    """A provider exporting to `settings.otlp_endpoint`, installed; None when no endpoint is set."""
    if settings.otlp_endpoint is None:
        return None
    _check_otlp_protos()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.otel_service_name}),
        sampler=ParentBasedTraceIdRatio(settings.trace_sample_ratio),
    )
    endpoint = settings.otlp_endpoint
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://")))
    )
    install(provider)
    return provider


class TracingUnavailable(RuntimeError):
    """Traces cannot be exported from this installation; the message says how to repair it."""


def _check_otlp_protos() -> None:
    """Some packages (xds-protos, Envoy's API) ship an old copy of the `opentelemetry.proto`
    modules; installed after opentelemetry-proto they overwrite them, and the OTLP exporter
    cannot encode spans. flowport does not depend on one, but an environment may hold one."""
    from importlib import metadata

    from opentelemetry.proto.trace.v1 import trace_pb2

    if not hasattr(trace_pb2, "ScopeSpans"):
        version = metadata.version("opentelemetry-proto")
        raise TracingUnavailable(
            "the opentelemetry.proto modules are an older copy another package installed (xds-protos ships one); "
            "repair with "
            f"`pip install --force-reinstall --no-deps opentelemetry-proto=={version}`"
        )


def shutdown() -> None:
    """Export what is buffered and stop."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


def current_trace_id() -> str | None:
    """The active span's trace id as 32 hex digits, or None."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def extract(metadata: Any) -> OtelContext | None:
    """The caller's trace context from gRPC metadata (`traceparent`, `tracestate`)."""
    if _tracer is None:
        return None
    carrier = {name: value for name, value in metadata or () if name in ("traceparent", "tracestate")}
    extracted: OtelContext | None = _propagator.extract(carrier) if carrier else None
    return extracted


def inject(headers: dict[str, str]) -> None:
    """Add the active span's `traceparent` to outgoing `headers` (nothing with tracing off)."""
    if _tracer is not None:
        _propagator.inject(headers)


@contextmanager
def span(
    name: str,
    *,
    kind: Kind = "internal",
    attributes: Mapping[str, Any] | None = None,
    context: OtelContext | None = None,
) -> Iterator[trace.Span | None]:
    """A span around the block (None with tracing off); an exception marks it as an error.

    Callers on hot paths check `enabled()` first and skip the block's setup altogether.
    """
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    kinds = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}
    with _tracer.start_as_current_span(
        name, context=context, kind=kinds[kind], attributes=dict(attributes or {}), record_exception=True
    ) as current:
        yield current


def fail(current: trace.Span | None, message: str) -> None:
    """Mark `current` as failed without an exception (e.g. an RPC answered with an error status)."""
    if current is not None:
        from opentelemetry.trace import Status, StatusCode

        current.set_status(Status(StatusCode.ERROR, message))
