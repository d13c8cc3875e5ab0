"""Active health checks of registered services: a local service that stops answering turns
UNHEALTHY and comes back HEALTHY; an internal address outside the allowlist is never called."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowport.clients import AsyncClient
from flowport.server.app import Running, start, stop
from flowport.v1 import event_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2

from ..conftest import ADMIN_KEY, make_settings

HEALTHY = registry_pb2.RegisteredService.STATUS_HEALTHY
UNHEALTHY = registry_pb2.RegisteredService.STATUS_UNHEALTHY


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _Service:
    """A local HTTP service that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
        self.port = self.server.server_port
        self._serve()

    def _serve(self) -> None:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _Health)
        self._serve()


@pytest.fixture
async def fast(tmp_path: Path) -> AsyncIterator[AsyncClient]:
    running: Running = await start(make_settings(tmp_path, service_check_interval=0.2, service_check_timeout=1.0))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
            yield client
    finally:
        await stop(running, 1.0)


async def _external_apis(client: AsyncClient, status: str) -> Any:
    for _ in range(100):
        health = await client.gateway.GetHealth(gateway_pb2.GetHealthRequest())
        component = health.components.get("external_apis")
        if component is not None and component.status == status:
            return component
        await asyncio.sleep(0.1)
    raise AssertionError(f"external_apis did not become {status}: {health}")


async def _status_becomes(client: AsyncClient, service_id: str, status: int) -> registry_pb2.RegisteredService:
    for _ in range(100):
        got: registry_pb2.RegisteredService = await client.services.GetService(
            registry_pb2.GetServiceRequest(service_id=service_id)
        )
        if got.status == status:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service_id} did not become {registry_pb2.RegisteredService.Status.Name(status)}: {got}")


async def test_a_service_that_stops_answering_turns_unhealthy_then_recovers(fast: AsyncClient) -> None:
    service = _Service()
    try:
        await fast.services.RegisterService(
            registry_pb2.RegisterServiceRequest(
                service=registry_pb2.RegisteredService(
                    service_id="local", endpoint=f"http://127.0.0.1:{service.port}", health_path="/health"
                )
            )
        )
        healthy = await _status_becomes(fast, "local", HEALTHY)
        assert healthy.latency_ms > 0 and healthy.HasField("check_time") and healthy.check_message == ""
        external = await _external_apis(fast, "healthy")
        assert external.message == "" and external.HasField("last_check")
        service.stop()
        down = await _status_becomes(fast, "local", UNHEALTHY)
        assert down.check_message == "could not connect", down
        service.start()
        back = await _status_becomes(fast, "local", HEALTHY)
        assert back.check_message == "", "the reason goes with the failure"
    finally:
        service.stop()


async def test_a_wrong_path_and_an_internal_address_are_unhealthy(fast: AsyncClient) -> None:
    service = _Service()
    try:
        for service_id, endpoint, path, why in (
            ("wrong-path", f"http://127.0.0.1:{service.port}", "/missing", "answered HTTP 404, not 2xx"),
            # Private and not allowlisted: refused by the SSRF guard, never connected to; the
            # message names the settings that would allow it.
            ("internal", "http://10.255.255.1:8080", "/health", "not allowlisted (--http-allowlist, or --dev for"),
        ):
            await fast.services.RegisterService(
                registry_pb2.RegisterServiceRequest(
                    service=registry_pb2.RegisteredService(service_id=service_id, endpoint=endpoint, health_path=path)
                )
            )
            failed = await _status_becomes(fast, service_id, UNHEALTHY)
            assert why in failed.check_message, failed
        # GET /health (public) reports that services fail, never which nor how many.
        external = await _external_apis(fast, "degraded")
        assert external.message == "registered services failed their last check"
        health = await fast.gateway.GetHealth(gateway_pb2.GetHealthRequest())
        assert "wrong-path" not in str(health) and "10.255" not in str(health)
        # A tenant's failing endpoint is its own: the gateway's status, which every tenant's and the
        # operator's monitors read, stays as the gateway's own components say.
        assert health.status == "healthy"
        # Without a health path a registration is not checked.
        await fast.services.RegisterService(
            registry_pb2.RegisterServiceRequest(
                service=registry_pb2.RegisteredService(service_id="unchecked", endpoint="http://10.255.255.1")
            )
        )
        await asyncio.sleep(0.6)
        unchecked = await fast.services.GetService(registry_pb2.GetServiceRequest(service_id="unchecked"))
        assert unchecked.status == registry_pb2.RegisteredService.STATUS_UNSPECIFIED
        assert not unchecked.HasField("check_time")
    finally:
        service.stop()


async def test_grpc_endpoints_use_the_grpc_health_protocol(fast: AsyncClient) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await servicer.set("orders.v1.Orders", health_pb2.HealthCheckResponse.NOT_SERVING)
        for service_id, name in (("grpc-whole", ""), ("grpc-orders", "orders.v1.Orders"), ("grpc-unknown", "nope")):
            await fast.services.RegisterService(
                registry_pb2.RegisterServiceRequest(
                    service=registry_pb2.RegisteredService(
                        service_id=service_id, endpoint=f"grpc://127.0.0.1:{port}", health_service=name
                    )
                )
            )
        await _status_becomes(fast, "grpc-whole", HEALTHY)
        await _status_becomes(fast, "grpc-orders", UNHEALTHY)
        await _status_becomes(fast, "grpc-unknown", UNHEALTHY)  # NOT_FOUND from the health service
        await servicer.set("orders.v1.Orders", health_pb2.HealthCheckResponse.SERVING)
        await _status_becomes(fast, "grpc-orders", HEALTHY)
    finally:
        await server.stop(0)
    await _status_becomes(fast, "grpc-whole", UNHEALTHY)  # the server is gone


async def test_grpc_endpoint_shape_is_checked(fast: AsyncClient) -> None:
    from flowport.clients.errors import ApiError

    for endpoint in ("grpc://127.0.0.1", "grpc://127.0.0.1:50051/path", "ftp://127.0.0.1:21"):
        with pytest.raises(ApiError) as raised:
            await fast.services.RegisterService(
                registry_pb2.RegisterServiceRequest(
                    service=registry_pb2.RegisteredService(service_id="g", endpoint=endpoint)
                )
            )
        assert [f for f, _ in raised.value.violations] == ["service.endpoint"], endpoint


async def test_anonymous_health_has_statuses_and_latencies_but_no_counts(tmp_path: Path) -> None:
    running: Running = await start(make_settings(tmp_path, service_check_interval=0.2, service_check_timeout=1.0))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            await admin.services.RegisterService(
                registry_pb2.RegisterServiceRequest(
                    service=registry_pb2.RegisteredService(
                        service_id="failing", endpoint="http://10.255.255.1:8080", health_path="/health"
                    )
                )
            )
            await _status_becomes(admin, "failing", UNHEALTHY)
            await _external_apis(admin, "degraded")
            # An open stream and calls made: figures the gateway has, which /health must not show.
            stream = admin.events.StreamEvents(event_pb2.StreamEventsRequest())
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    health = await gateway_pb2_grpc.GatewayServiceStub(channel).GetHealth(
                        gateway_pb2.GetHealthRequest(), timeout=10
                    )
            finally:
                stream.cancel()
    finally:
        await stop(running, 1.0)
    assert health.status == "healthy" and health.components["external_apis"].status == "degraded"
    assert {"database", "server", "external_apis"} <= set(health.components)
    assert health.components["database"].latency > 0
    for name, component in health.components.items():
        assert component.status in ("healthy", "degraded", "unhealthy"), name
        assert not component.HasField("details"), f"{name}: {component.details}"
        assert not any(c.isdigit() for c in component.message), f"{name}: {component.message}"


async def test_the_sweep_reads_registrations_in_turns_without_their_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant's many registrations of large metadata are parsed a turn at a time, other calls
    running in between, and held for the sweep without the metadata it never reads."""
    from flowport.server.storage import SqliteStore
    from flowport.server.storage import services as service_rows

    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        for n in range(3 * service_rows.PARSED_PER_TURN):
            service = registry_pb2.RegisteredService(service_id=f"s{n}", endpoint="https://s.example.com/x")
            service.metadata.update({"notes": "x" * 4000})
            await store.register_service("t", service, None, 1)
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        parsed_at: list[int] = []  # the ticker's count as each registration is parsed

        class _Counted:
            class RegisteredService:
                @staticmethod
                def FromString(body: bytes) -> registry_pb2.RegisteredService:
                    parsed_at.append(ticks)
                    return registry_pb2.RegisteredService.FromString(body)

        monkeypatch.setattr(service_rows, "registry_pb2", _Counted)
        ticker = asyncio.create_task(ticking())
        found = await store.services_to_check(2)
        ticker.cancel()
        assert len(found) == 3 * service_rows.PARSED_PER_TURN
        assert all(tenant == "t" and not service.HasField("metadata") for tenant, service in found)
        assert len(set(parsed_at)) == 3, sorted(set(parsed_at))  # three turns, the ticker ran between
    finally:
        await store.close()
