"""OpenTelemetry: one REST call through a real Envoy that runs a two-node workflow is one
trace. Envoy (its OpenTelemetry tracer, exporting to a collector this test runs) starts the
trace and hands its span to the server; the server's spans, caught by an in-memory
exporter, cover the RPC, the execution and both nodes, under Envoy's trace id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowport.server.app import start, stop
from flowport.server.observability import tracing

from ..conftest import ADMIN_HEADERS, EnvoyProcess, free_port, make_settings

pytestmark = pytest.mark.integration


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC trace receiver: keeps every span Envoy exports."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource in request.resource_spans:
            # xds-protos may have replaced these modules with an older copy, where the same
            # field (2) is called instrumentation_library_spans; the wire format is the same.
            scopes = getattr(resource, "scope_spans", None) or resource.instrumentation_library_spans
            for scope in scopes:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[_Collector, int]]:
    server = grpc.aio.server()
    receiver = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(0)


@pytest.fixture
def spans() -> AsyncIterator[InMemorySpanExporter] | Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


TWO_NODES = {
    "name": "traced",
    "nodes": [
        {"type": "PythonCodeNode", "name": "double", "config": {"code": "result = {'n': n * 2}"}},
        {"type": "PythonCodeNode", "name": "inc", "config": {"code": "result = {'n': data['n'] + 1}"}},
    ],
    "connections": [{"from_node": "double", "from_output": "result", "to_node": "inc", "to_input": "data"}],
}


def _hex(raw: bytes) -> str:
    return raw.hex()


def _for_path(exported: list[Any], path: str) -> list[Any]:
    """Envoy's spans (named `ingress`) of requests to `path`, found by their URL attribute."""
    return [span for span in exported if any(path in attribute.value.string_value for attribute in span.attributes)]


async def test_one_rest_call_is_one_trace_from_envoy_to_each_node(
    tmp_path: Path, collector: tuple[_Collector, int], spans: InMemorySpanExporter
) -> None:
    receiver, collector_port = collector
    settings = make_settings(tmp_path / "data", grpc_port=free_port())
    running = await start(settings)
    # Envoy traces and exports to the collector; the server's spans go to the in-memory exporter.
    envoy = EnvoyProcess(
        settings.model_copy(update={"otlp_endpoint": f"http://127.0.0.1:{collector_port}"}),
        # Export each span at once instead of batching five or waiting 5 s.
        runtime={"tracing.opentelemetry.min_flush_spans": 1, "tracing.opentelemetry.flush_interval_ms": 200},
    )
    await asyncio.to_thread(envoy.start)
    try:
        async with httpx.AsyncClient(base_url=settings.http_url, headers=ADMIN_HEADERS, timeout=20) as http:
            for _ in range(100):  # until Envoy's health check has seen the server
                if (await http.get("/healthz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            created = await http.post("/api/workflows", json=TWO_NODES)
            assert created.status_code == 200, created.text
            workflow_id = created.json()["workflow_id"]
            spans.clear()
            answer = await http.post(f"/workflows/{workflow_id}/execute", json={"inputs": {"n": 20}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["state"] == "STATE_SUCCEEDED"
        for _ in range(300):  # Envoy exports on its own schedule
            if _for_path(receiver.spans, f"/workflows/{workflow_id}/execute"):
                break
            await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(envoy.stop)
        await stop(running, 1.0)

    edge = _for_path(receiver.spans, f"/workflows/{workflow_id}/execute")
    assert len(edge) == 1, [(s.name, [a.key for a in s.attributes]) for s in receiver.spans]
    trace_id, edge_span_id = _hex(edge[0].trace_id), _hex(edge[0].span_id)

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_name = {span.name: span for span in finished if span.context is not None}
    rpc = by_name["flowport.v1.ExecutionService/CreateExecution"]
    execution = by_name["execution"]
    nodes = [by_name["node double"], by_name["node inc"]]
    assert rpc.context is not None and rpc.parent is not None
    assert format(rpc.context.trace_id, "032x") == trace_id, "the server continued Envoy's trace"
    assert format(rpc.parent.span_id, "016x") == edge_span_id, "the RPC span is a child of Envoy's span"
    assert execution.parent is not None and execution.parent.span_id == rpc.context.span_id
    for node in nodes:
        assert node.context is not None and node.parent is not None and execution.context is not None
        assert node.context.trace_id == rpc.context.trace_id
        assert node.parent.span_id == execution.context.span_id
    assert execution.attributes is not None and execution.attributes["flowport.state"] == "STATE_SUCCEEDED"
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == 0
    # Everything else in the window is Envoy's health checking of the server, each its own trace.
    others = {s.name for s in finished if s.context is not None and format(s.context.trace_id, "032x") != trace_id}
    assert others <= {"grpc.health.v1.Health/Check"}, others


async def test_tracing_off_makes_no_spans_and_a_failed_call_is_an_error_span(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    from flowport.clients import AsyncClient
    from flowport.clients.errors import ApiError
    from flowport.v1 import session_pb2

    from ..conftest import ADMIN_KEY

    running = await start(make_settings(tmp_path / "data"))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY, retries=1) as client:
            with pytest.raises(ApiError):
                await client.sessions.GetSession(session_pb2.GetSessionRequest(session_id="ses_nope"))
            # The status reaches the client while the server is still closing the span.
            failed: list[ReadableSpan] = []
            for _ in range(200):
                failed = [s for s in spans.get_finished_spans() if s.name.endswith("/GetSession")]
                if failed:
                    break
                await asyncio.sleep(0.01)
            assert len(failed) == 1 and failed[0].status.status_code.name == "ERROR"
            assert failed[0].attributes is not None and failed[0].attributes["rpc.grpc.status_code"] == 5
            tracing.install(None)
            spans.clear()
            await client.sessions.CreateSession(session_pb2.CreateSessionRequest())
            assert spans.get_finished_spans() == ()
            assert not tracing.enabled() and tracing.current_trace_id() is None
    finally:
        await stop(running, 1.0)


def test_overwritten_otlp_modules_stop_the_start_with_the_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What xds-protos's older copy of opentelemetry.proto looks like to the exporter.
    from opentelemetry.proto.trace.v1 import trace_pb2

    if hasattr(trace_pb2, "ScopeSpans"):
        monkeypatch.delattr(trace_pb2, "ScopeSpans")
    settings = make_settings(tmp_path / "data", otlp_endpoint="http://127.0.0.1:4317")
    with pytest.raises(
        tracing.TracingUnavailable, match="pip install --force-reinstall --no-deps opentelemetry-proto=="
    ):
        tracing.setup(settings)
    assert not tracing.enabled()
