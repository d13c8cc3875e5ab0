"""Prometheus /metrics on its own loopback port (and through Envoy for admins): it parses with
the Prometheus text parser, holds every documented metric, counts what was done, and with two
workers adds them up."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowport.clients import Client
from flowport.v1 import session_pb2

from ..conftest import ADMIN_KEY, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration

DOCUMENTED = {
    "flowport_rpc_requests": "counter",
    "flowport_rpc_duration_seconds": "histogram",
    "flowport_streams_open": "gauge",
    "flowport_executions": "counter",
    "flowport_executions_running": "gauge",
    "flowport_execution_duration_seconds": "histogram",
    "flowport_webhook_deliveries": "counter",
    "flowport_webhook_deliveries_pending": "gauge",
    "flowport_sandbox_workers_busy": "gauge",
    "flowport_sandbox_workers": "gauge",
    "flowport_store_operation_duration_seconds": "histogram",
    "flowport_auth_failures": "counter",
    "flowport_rate_limited": "counter",
}
CREATE = "/flowport.v1.SessionService/CreateSession"


def _scrape(settings_port: int) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Families by name: {(sample name, sorted labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{settings_port}/metrics", timeout=10).text
    families: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(f"{family.name}:{family.type}", {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families


def _value(
    families: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]], sample: str, **labels: str
) -> float:
    key = (sample, tuple(sorted(labels.items())))
    return sum(samples.get(key, 0.0) for samples in families.values())


def test_metrics_parse_hold_every_documented_metric_and_count(stack: Stack) -> None:
    port = stack.settings.metrics_port
    before = _scrape(port)
    with Client(stack.settings.grpc_target, api_key=ADMIN_KEY) as client:
        for _ in range(3):
            client.sessions.CreateSession(session_pb2.CreateSessionRequest())
        done = client.run_workflow({"name": "m", "nodes": [{"type": "MergeNode", "name": "m"}]}, {})
        assert done.workflow_id
    after = _scrape(port)
    for name, kind in DOCUMENTED.items():
        assert f"{name}:{kind}" in after, f"{name} ({kind}) missing from /metrics"
    created = _value(after, "flowport_rpc_requests_total", method=CREATE, code="OK") - _value(
        before, "flowport_rpc_requests_total", method=CREATE, code="OK"
    )
    assert created == 3
    observed = _value(after, "flowport_rpc_duration_seconds_count", method=CREATE, code="OK") - _value(
        before, "flowport_rpc_duration_seconds_count", method=CREATE, code="OK"
    )
    assert observed == 3
    succeeded = _value(after, "flowport_executions_total", state="succeeded") - _value(
        before, "flowport_executions_total", state="succeeded"
    )
    assert succeeded == 1
    durations = after["flowport_execution_duration_seconds:histogram"]
    assert any(dict(labels).get("workflow") == done.workflow_id for _, labels in durations)
    assert _value(after, "flowport_sandbox_workers") == stack.settings.sandbox_workers
    assert _value(after, "flowport_store_operation_duration_seconds_count", operation="write") > 0
    # Through Envoy only with an admin's credential (GatewayService.GetMetrics).
    assert httpx.get(f"{stack.settings.http_url}/metrics", timeout=10).status_code == 401


@pytest.mark.skipif(sys.platform != "linux", reason="flowport up --workers needs Linux here")
def test_two_workers_add_up(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    settings = make_settings(tmp_path / "data", workers=2, database_url=postgres_url, redis_url=redis_url)
    running = start_up(settings)
    try:
        first, second = settings.grpc_ports
        before = _value(_scrape(settings.metrics_port), "flowport_rpc_requests_total", method=CREATE, code="OK")
        for port, count in ((first, 4), (second, 5)):
            target = settings.model_copy(update={"grpc_port": port}).grpc_target
            with Client(target, api_key=ADMIN_KEY) as client:
                for _ in range(count):
                    client.sessions.CreateSession(session_pb2.CreateSessionRequest())
        families = _scrape(settings.metrics_port)
        assert _value(families, "flowport_rpc_requests_total", method=CREATE, code="OK") - before == 9
        # Each worker's sandbox pool, summed over the live processes.
        assert _value(families, "flowport_sandbox_workers") == 2 * settings.sandbox_workers
    finally:
        stop_up(running)
