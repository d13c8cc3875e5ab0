"""MCPServiceDiscoveryNode end to end: the seed's discovery workflow against local services,
round-robin and least-latency selection over many runs, tenant scoping, and the cache."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from flowport.clients import AsyncClient
from flowport.server.api import service_registry
from flowport.server.app import Running, start, stop
from flowport.server.nodes import service_discovery
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.v1 import apikey_pb2, execution_pb2, registry_pb2

from ..conftest import ADMIN_KEY, make_settings
from .test_service_health import _Service

SEED_VALIDATION = """
healthy_services = []
for service in discovered_services:
    if service.get('health', {}).get('status') == 'healthy':
        healthy_services.append({
            'id': service['id'],
            'endpoint': service['endpoint'],
            'capabilities': service['capabilities'],
            'latency': service.get('health', {}).get('latency', 0)
        })
healthy_services.sort(key=lambda s: s['latency'])
result = {'services': healthy_services, 'count': len(healthy_services),
          'discovery_timestamp': datetime.now().isoformat()}
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start(make_settings(tmp_path, service_check_interval=0.2, service_check_timeout=1.0))
    try:
        yield running
    finally:
        await stop(running, 1.0)


@pytest.fixture
async def admin(server: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as client:
        yield client


async def _register(client: AsyncClient, service_id: str, endpoint: str, **fields: Any) -> None:
    service = registry_pb2.RegisteredService(service_id=service_id, endpoint=endpoint, **fields)
    await client.services.RegisterService(registry_pb2.RegisterServiceRequest(service=service))


async def _run(client: AsyncClient, config: dict[str, Any], extra: list[dict[str, Any]] | None = None) -> Any:
    workflow = {
        "name": "discovery",
        "nodes": [{"type": "MCPServiceDiscoveryNode", "name": "discover_services", "config": config}, *(extra or [])],
    }
    if extra:
        workflow["connections"] = [
            {
                "from_node": "discover_services",
                "from_output": "result",
                "to_node": extra[0]["name"],
                "to_input": "discovered_services",
            }
        ]
    done = await client.run_workflow(workflow, {})
    assert done.state == execution_pb2.Execution.STATE_SUCCEEDED, done.error.message
    return json_format.MessageToDict(done.outputs)


async def _wait_checked(client: AsyncClient, count: int) -> None:
    for _ in range(100):
        listed = await client.services.ListServices(registry_pb2.ListServicesRequest())
        if sum(1 for s in listed.services if s.HasField("check_time")) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the health checks did not run")


async def test_the_seed_discovery_workflow_end_to_end(admin: AsyncClient) -> None:
    up, down = _Service(), _Service()
    down.stop()  # registered, but not answering
    try:
        common = {"capabilities": ["analytics", "data_processing"], "compliance_zones": ["gdpr", "hipaa"]}
        await _register(
            admin, "analytics-a", f"http://127.0.0.1:{up.port}", provider="internal", health_path="/health", **common
        )
        await _register(
            admin, "analytics-b", f"http://127.0.0.1:{down.port}", provider="internal", health_path="/health", **common
        )
        await _register(
            admin,
            "analytics-us",
            f"http://127.0.0.1:{up.port}",
            health_path="/health",
            capabilities=["analytics", "data_processing"],
            compliance_zones=["us"],
        )
        await _register(
            admin,
            "reporting",
            f"http://127.0.0.1:{up.port}",
            health_path="/health",
            capabilities=["reporting"],
            **{"compliance_zones": ["gdpr", "hipaa"]},
        )
        await _wait_checked(admin, 4)
        config = {
            "tenant_context": {"id": "default", "compliance_zones": ["gdpr", "hipaa"], "service_tier": "enterprise"},
            "required_capabilities": ["analytics", "data_processing"],
            "preferred_providers": ["internal", "trusted_partners"],
            "cache_duration": 300,
            "health_check": False,  # every match; the PythonCodeNode keeps the healthy ones, as in the seed
            "load_balancing": "round_robin",
        }
        validate = {"type": "PythonCodeNode", "name": "validate_services", "config": {"code": SEED_VALIDATION}}
        outputs = await _run(admin, config, [validate])
        found = outputs["discover_services"]
        assert sorted(s["id"] for s in found["services"]) == ["analytics-a", "analytics-b"], "zones and capabilities"
        statuses = {s["id"]: s["health"]["status"] for s in found["services"]}
        assert statuses == {"analytics-a": "healthy", "analytics-b": "unhealthy"}
        validated = outputs["validate_services"]["result"]
        assert [s["id"] for s in validated["services"]] == ["analytics-a"] and validated["count"] == 1
        # With health_check on, the node itself keeps only healthy services.
        healthy = await _run(admin, {**config, "health_check": True, "cache_duration": 0})
        assert [s["id"] for s in healthy["discover_services"]["services"]] == ["analytics-a"]
    finally:
        up.stop()


async def test_round_robin_and_least_latency_over_many_runs(admin: AsyncClient) -> None:
    for name in ("svc-1", "svc-2", "svc-3"):
        await _register(admin, name, "http://127.0.0.1:9", capabilities=["work"])
    config = {"required_capabilities": ["work"], "health_check": False, "load_balancing": "round_robin"}
    picks = [(await _run(admin, config))["discover_services"]["selected"]["id"] for _ in range(9)]
    assert Counter(picks) == {"svc-1": 3, "svc-2": 3, "svc-3": 3}, picks
    assert picks[:3] in (["svc-1", "svc-2", "svc-3"], ["svc-2", "svc-3", "svc-1"], ["svc-3", "svc-1", "svc-2"])
    # Least latency: the fastest checked service first, unchecked ones last.
    fast_service, slow_service = _Service(), _Service()
    try:
        await _register(
            admin, "lat-fast", f"http://127.0.0.1:{fast_service.port}", capabilities=["lat"], health_path="/health"
        )
        await _register(admin, "lat-unchecked", "http://127.0.0.1:9", capabilities=["lat"])
        await _wait_checked(admin, 1)
        least = {"required_capabilities": ["lat"], "health_check": False, "load_balancing": "least_latency"}
        for _ in range(5):
            ordered = [s["id"] for s in (await _run(admin, least))["discover_services"]["services"]]
            assert ordered == ["lat-fast", "lat-unchecked"]
    finally:
        fast_service.stop()
        slow_service.stop()


async def test_another_tenant_is_never_seen_and_cannot_be_named(admin: AsyncClient, server: Running) -> None:
    await _register(admin, "default-only", "http://127.0.0.1:9", capabilities=["x"])
    created = await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="beta", roles=["user"]))
    )
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=created.key) as beta:
        outputs = await _run(beta, {"required_capabilities": ["x"], "health_check": False})
        assert outputs["discover_services"]["services"] == [] and outputs["discover_services"]["count"] == 0
        workflow = {
            "name": "spy",
            "nodes": [
                {
                    "type": "MCPServiceDiscoveryNode",
                    "name": "d",
                    "config": {"tenant_context": {"id": "default"}, "health_check": False},
                }
            ],
        }
        failed = await beta.run_workflow(workflow, {})
        assert failed.state == execution_pb2.Execution.STATE_FAILED and "TENANT_MISMATCH" in str(failed.error)


async def test_cache_duration_reuses_the_list(admin: AsyncClient) -> None:
    config = {"required_capabilities": ["cached"], "health_check": False, "cache_duration": 300}
    await _register(admin, "cached-1", "http://127.0.0.1:9", capabilities=["cached"])
    first = await _run(admin, config)
    await _register(admin, "cached-2", "http://127.0.0.1:9", capabilities=["cached"])
    again = await _run(admin, config)
    assert first["discover_services"]["count"] == again["discover_services"]["count"] == 1, "served from the cache"
    fresh = await _run(admin, {**config, "cache_duration": 0})
    assert fresh["discover_services"]["count"] == 2


async def test_the_nodes_memory_of_filters_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters may come from execution inputs: each new one must not be kept for good."""
    monkeypatch.setattr(service_discovery, "MAX_REMEMBERED", 8)

    class Directory:
        async def list_services(self, tenant: str, **_: Any) -> list[registry_pb2.RegisteredService]:
            service = registry_pb2.RegisteredService(
                service_id="s", endpoint="https://s.example.com", status=registry_pb2.RegisteredService.STATUS_HEALTHY
            )
            service.capabilities.extend(["any"] + [f"c{n}" for n in range(100)])
            return [service]

    node = service_discovery.MCPServiceDiscoveryNode()
    ctx = NodeContext("t", "exe_1", "find", 1, 10.0, NodeServices(registry=Directory()))  # type: ignore[arg-type]
    for n in range(100):
        params = {"required_capabilities": [f"c{n}"], "cache_duration": 60}
        found = await node.run(ctx, node.prepare(params), params)
        assert found["count"] == 1
    assert len(node._cache) == len(node._turns) == 8


async def test_the_nodes_cache_holds_a_bounded_number_of_registrations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_discovery, "MAX_CACHED_SERVICES", 50)

    class Directory:
        async def list_services(self, tenant: str, **_: Any) -> list[registry_pb2.RegisteredService]:
            healthy = registry_pb2.RegisteredService.STATUS_HEALTHY
            found = []
            for n in range(20):
                service = registry_pb2.RegisteredService(
                    service_id=f"s{n:02}", endpoint="https://s.example.com", status=healthy
                )
                service.capabilities.extend(f"c{c}" for c in range(10))
                found.append(service)
            return found

    node = service_discovery.MCPServiceDiscoveryNode()
    ctx = NodeContext("t", "exe_1", "find", 1, 10.0, NodeServices(registry=Directory()))  # type: ignore[arg-type]
    for c in range(10):  # ten filters, twenty registrations each: 200 without the bound
        params = {"required_capabilities": [f"c{c}"], "cache_duration": 60}
        assert (await node.run(ctx, node.prepare(params), params))["count"] == 20
    held = sum(len(found) for _, found in node._cache.values())
    assert 0 < held <= 50 and held == node._cached


async def test_the_nodes_work_is_bounded_before_its_outputs_are_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations past a node's outputs are refused before they are written out (each one's
    metadata through json_format), and a filter no registration can meet is refused at once."""
    assert service_discovery.MAX_REQUIRED == service_registry.MAX_LABELS
    written: list[str] = []
    describe = service_discovery.describe

    def counted(service: registry_pb2.RegisteredService) -> dict[str, Any]:
        written.append(service.service_id)
        return describe(service)

    monkeypatch.setattr(service_discovery, "describe", counted)

    class Directory:
        async def list_services(self, tenant: str, **_: Any) -> list[registry_pb2.RegisteredService]:
            found = []
            for n in range(400):  # 400 of 24 KB of metadata (one page): about 10 MB
                service = registry_pb2.RegisteredService(
                    service_id=f"s{n:03}",
                    endpoint="https://s.example.com",
                    status=registry_pb2.RegisteredService.STATUS_HEALTHY,
                )
                service.metadata.update({"notes": "x" * 24_000})
                found.append(service)
            return found

    node = service_discovery.MCPServiceDiscoveryNode()
    ctx = NodeContext("t", "exe_1", "find", 1, 10.0, NodeServices(registry=Directory()))  # type: ignore[arg-type]
    params: dict[str, Any] = {}
    with pytest.raises(NodeError) as caught:
        await node.run(ctx, node.prepare(params), params)
    assert caught.value.reason == "OUTPUT_TOO_LARGE"
    assert 0 < len(written) < 8 * 2**20 // 24_000, len(written)
    params = {"required_capabilities": [f"c{n}" for n in range(33)]}
    with pytest.raises(NodeError) as caught:
        await node.run(ctx, node.prepare(params), params)
    assert caught.value.reason == "INVALID_PARAMETER" and "at most 32" in caught.value.message
    params = {"required_capabilities": ["c"] * 40}  # one name, given 40 times: matches none here
    assert (await node.run(ctx, node.prepare(params), params))["count"] == 0
    params = {"required_capabilities": "c"}
    with pytest.raises(NodeError, match="a list of names"):
        await node.run(ctx, node.prepare(params), params)
