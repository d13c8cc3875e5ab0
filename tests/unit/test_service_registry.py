"""The service registry against the real server (SQLite and PostgreSQL): registration,
filtering, TTLs renewed by heartbeats, bad input, and tenant isolation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from flowport.clients import ApiError, AsyncClient
from flowport.server.api import service_registry
from flowport.server.app import Running
from flowport.v1 import apikey_pb2, registry_pb2


def _service(service_id: str, **fields: Any) -> registry_pb2.RegisteredService:
    values: dict[str, Any] = {"endpoint": f"http://127.0.0.1:9/{service_id}", "provider": "internal"}
    values.update(fields)
    return registry_pb2.RegisteredService(service_id=service_id, **values)


async def _register(client: AsyncClient, service: registry_pb2.RegisteredService) -> registry_pb2.RegisteredService:
    made: registry_pb2.RegisteredService = await client.services.RegisterService(
        registry_pb2.RegisterServiceRequest(service=service)
    )
    return made


async def _ids(client: AsyncClient, **filters: Any) -> list[str]:
    request = registry_pb2.ListServicesRequest(page_size=2, **filters)
    return [s.service_id async for s in client.paginate(client.services.ListServices, request)]


@pytest.fixture
async def beta(admin: AsyncClient, running: Running) -> AsyncIterator[AsyncClient]:
    created = await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="beta", roles=["user"]))
    )
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=created.key) as client:
        yield client


async def test_register_get_list_and_deregister(admin: AsyncClient) -> None:
    made = await _register(
        admin,
        _service("analytics-eu", capabilities=["analytics", "data_processing"], compliance_zones=["eu", "gdpr"]),
    )
    assert made.tenant == "default" and made.HasField("create_time") and not made.HasField("expire_time")
    assert made.status == registry_pb2.RegisteredService.STATUS_UNSPECIFIED
    got = await admin.services.GetService(registry_pb2.GetServiceRequest(service_id="analytics-eu"))
    assert got == made
    # What the registry says of a service is its own: a registration's claims are dropped.
    claims = _service("claims", status=registry_pb2.RegisteredService.STATUS_HEALTHY, check_message="forged: all good")
    claims.latency_ms, claims.tenant = 0.1, "other"
    claimed = await _register(admin, claims)
    assert (claimed.status, claimed.check_message, claimed.latency_ms, claimed.tenant) == (
        registry_pb2.RegisteredService.STATUS_UNSPECIFIED,
        "",
        0,
        "default",
    )
    # Registering the id again replaces it, keeping its first creation time.
    again = await _register(admin, _service("analytics-eu", endpoint="https://analytics.example.com"))
    assert again.endpoint == "https://analytics.example.com" and again.create_time == made.create_time
    await admin.services.DeregisterService(registry_pb2.DeregisterServiceRequest(service_id="analytics-eu"))
    with pytest.raises(ApiError) as gone:
        await admin.services.GetService(registry_pb2.GetServiceRequest(service_id="analytics-eu"))
    assert (gone.value.code(), gone.value.reason) == (grpc.StatusCode.NOT_FOUND, "SERVICE_NOT_FOUND")
    with pytest.raises(ApiError) as twice:
        await admin.services.DeregisterService(registry_pb2.DeregisterServiceRequest(service_id="analytics-eu"))
    assert twice.value.code() is grpc.StatusCode.NOT_FOUND


async def test_list_filters_by_capability_provider_and_zone_across_pages(admin: AsyncClient) -> None:
    await _register(admin, _service("a-internal", capabilities=["analytics"], compliance_zones=["eu"]))
    await _register(admin, _service("b-partner", capabilities=["analytics", "ml"], provider="trusted_partners"))
    await _register(admin, _service("c-internal", capabilities=["ml"], compliance_zones=["eu", "us"]))
    await _register(admin, _service("d-internal", capabilities=["analytics", "ml"], compliance_zones=["us"]))
    await _register(admin, _service("e-internal"))
    assert await _ids(admin) == ["a-internal", "b-partner", "c-internal", "d-internal", "e-internal"]
    assert await _ids(admin, capabilities=["analytics"]) == ["a-internal", "b-partner", "d-internal"]
    assert await _ids(admin, capabilities=["analytics", "ml"]) == ["b-partner", "d-internal"]
    assert await _ids(admin, provider="internal") == ["a-internal", "c-internal", "d-internal", "e-internal"]
    assert await _ids(admin, compliance_zone="eu") == ["a-internal", "c-internal"]
    assert await _ids(admin, capabilities=["ml"], provider="internal", compliance_zone="us") == [
        "c-internal",
        "d-internal",
    ]
    # A page token belongs to its filters.
    first = await admin.services.ListServices(registry_pb2.ListServicesRequest(page_size=1, provider="internal"))
    with pytest.raises(ApiError) as mixed:
        await admin.services.ListServices(
            registry_pb2.ListServicesRequest(page_size=1, provider="trusted_partners", page_token=first.next_page_token)
        )
    assert mixed.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_ttl_expires_unless_renewed_by_heartbeats(admin: AsyncClient) -> None:
    # Heartbeats every 0.5 s renew a 2 s TTL: a stall of the machine has 1.5 s before one is late.
    ttl = duration_pb2.Duration(seconds=2)
    made = await _register(admin, _service("short-lived", ttl=ttl))
    assert made.HasField("expire_time")
    for _ in range(6):  # kept alive past its TTL by heartbeats
        await asyncio.sleep(0.5)
        renewed = await admin.services.Heartbeat(registry_pb2.HeartbeatRequest(service_id="short-lived"))
        assert renewed.expire_time.ToMicroseconds() > made.expire_time.ToMicroseconds()
    assert "short-lived" in await _ids(admin)
    await asyncio.sleep(2.3)  # no heartbeat: it drops out
    assert "short-lived" not in await _ids(admin)
    with pytest.raises(ApiError) as expired:
        await admin.services.Heartbeat(registry_pb2.HeartbeatRequest(service_id="short-lived"))
    assert expired.value.reason == "SERVICE_NOT_FOUND"
    await _register(admin, _service("forever"))
    with pytest.raises(ApiError) as no_ttl:
        await admin.services.Heartbeat(registry_pb2.HeartbeatRequest(service_id="forever"))
    assert (no_ttl.value.code(), no_ttl.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SERVICE_HAS_NO_TTL")


async def test_bad_registrations_name_every_field(admin: AsyncClient) -> None:
    bad = registry_pb2.RegisteredService(
        service_id="Bad Id",
        endpoint="ftp://x",
        capabilities=["ok", "not ok"],
        provider="also bad",
        health_path="health",
        ttl=duration_pb2.Duration(seconds=0),
    )
    bad.metadata.update({"notes": "x" * 20_000})  # discovery reads thousands of registrations at once
    with pytest.raises(ApiError) as caught:
        await _register(admin, bad)
    fields = [field for field, _ in caught.value.violations]
    assert fields == [
        "service.service_id",
        "service.endpoint",
        "service.capabilities[1]",
        "service.provider",
        "service.health_path",
        "service.ttl",
        "service.metadata",
    ]
    assert await _ids(admin) == [], "nothing was registered"
    with pytest.raises(ApiError) as bad_id:
        await admin.services.GetService(registry_pb2.GetServiceRequest(service_id="../x"))
    assert bad_id.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_tenant_sees_only_its_own_services(admin: AsyncClient, beta: AsyncClient) -> None:
    await _register(admin, _service("shared-name", capabilities=["default-only"]))
    await _register(beta, _service("shared-name", capabilities=["beta-only"]))
    await _register(admin, _service("default-private"))
    assert await _ids(beta) == ["shared-name"]
    mine = await beta.services.GetService(registry_pb2.GetServiceRequest(service_id="shared-name"))
    assert list(mine.capabilities) == ["beta-only"] and mine.tenant == "beta"
    for call in (
        beta.services.GetService(registry_pb2.GetServiceRequest(service_id="default-private")),
        beta.services.Heartbeat(registry_pb2.HeartbeatRequest(service_id="default-private")),
        beta.services.DeregisterService(registry_pb2.DeregisterServiceRequest(service_id="default-private")),
    ):
        with pytest.raises(ApiError) as hidden:
            await call
        assert hidden.value.code() is grpc.StatusCode.NOT_FOUND
    assert "default-private" in await _ids(admin), "beta's attempts changed nothing"


async def test_a_retried_registration_is_answered_once(admin: AsyncClient) -> None:
    request = registry_pb2.RegisterServiceRequest(service=_service("once"), request_id="reg-1")
    first = await admin.services.RegisterService(request)
    second = await admin.services.RegisterService(request)
    assert first == second
    other = registry_pb2.RegisterServiceRequest(service=_service("other"), request_id="reg-1")
    with pytest.raises(ApiError) as reused:
        await admin.services.RegisterService(other)
    assert reused.value.reason == "REQUEST_ID_REUSED"


async def test_a_small_page_over_a_rare_filter_reads_rows_in_batches(
    admin: AsyncClient, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of one through a filter that few registrations match reads the rows in batches, not
    two at a time (thousands of reads), and still pages through every match in order."""
    for n in range(40):
        await _register(admin, _service(f"s{n:02}", capabilities=["rare"] if n in (3, 17, 38) else []))
    reads: list[int] = []
    store = running.store
    read = store.list_services

    async def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(kwargs["limit"])
        return await read(*args, **kwargs)

    monkeypatch.setattr(store, "list_services", counted)
    request = registry_pb2.ListServicesRequest(page_size=1, capabilities=["rare"])
    found = [s.service_id async for s in admin.paginate(admin.services.ListServices, request)]
    assert found == ["s03", "s17", "s38"]
    assert len(reads) <= 4 and set(reads) == {service_registry.SCAN_BATCH}, reads  # two rows a read: 20 reads
