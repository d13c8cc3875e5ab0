"""Workflow configs as Kailash users write them, through a real Envoy: nodes with `parameters`,
names with spaces (ids made from them, or given), and `${tenant_id}` in the seed's
MCPServiceDiscoveryNode config."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _run(http: httpx.Client, workflow_id: str, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    response = http.post("/api/executions", json={"workflow_id": workflow_id, "inputs": inputs or {}, "wait": True})
    assert response.status_code == 200, response.text
    execution: dict[str, Any] = response.json()
    assert execution["state"] == "STATE_SUCCEEDED", execution
    return execution


def test_a_name_with_spaces_gets_an_id_made_from_it(http: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:6]
    name = f"Tenant Isolation Workflow {tag}"
    node = {"type": "PythonCodeNode", "id": "check", "parameters": {"code": "result = {'ok': True}"}}
    created = http.post("/api/workflows", json={"name": name, "nodes": [node]})
    assert created.status_code == 200, created.text
    body = created.json()
    assert (body["name"], body["workflow_id"]) == (name, f"Tenant_Isolation_Workflow_{tag}")
    assert body["nodes"][0]["config"] == {"code": "result = {'ok': True}"}
    assert "parameters" not in body["nodes"][0]
    assert _run(http, body["workflow_id"])["outputs"]["check"]["result"] == {"ok": True}


def test_kailash_workflow_id_and_name_both_given(http: httpx.Client) -> None:
    workflow_id = f"tenant_isolation_{uuid.uuid4().hex[:6]}"
    node = {"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}}
    body = {"workflow_id": workflow_id, "name": "Tenant Isolation Workflow", "nodes": [node]}
    created = http.post("/api/workflows", json=body)
    assert created.status_code == 200, created.text
    assert http.get(f"/api/workflows/{workflow_id}").json()["name"] == "Tenant Isolation Workflow"
    again = http.post("/api/workflows", json=body).json()
    assert (again["workflow_id"], again["version"]) == (workflow_id, 2)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "ok", "workflow_id": "has spaces"}, "workflow_id"),
        ({"name": "bell\u0007"}, "name"),
        (
            {
                "name": "both",
                "nodes_override": [{"type": "PythonCodeNode", "name": "a", "config": {}, "parameters": {}}],
            },
            "nodes[0].parameters",
        ),
    ],
)
def test_bad_names_ids_and_configs_are_400_naming_the_field(
    http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    nodes = body.pop("nodes_override", [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}}])
    response = http.post("/api/workflows", json={**body, "nodes": nodes})
    assert response.status_code == 400, response.text
    fields = [v["field"] for d in response.json()["details"] for v in d.get("field_violations", [])]
    assert field in fields, response.text


def test_the_seeds_service_discovery_config_resolves_tenant_id(http: httpx.Client) -> None:
    """The seed's MCPServiceDiscoveryNode: `tenant_context.id` is `${tenant_id}`, the execution's tenant."""
    service_id = f"analytics-{uuid.uuid4().hex[:6]}"
    service = {
        "service_id": service_id,
        "endpoint": "http://127.0.0.1:9/analytics",
        "capabilities": ["analytics", "data_processing"],
        "provider": "internal",
        "compliance_zones": ["gdpr", "hipaa"],
    }
    registered = http.post("/api/services", json=service)
    assert registered.status_code == 200, registered.text
    discover = {
        "type": "MCPServiceDiscoveryNode",
        "name": "discover_services",
        "parameters": {
            "tenant_context": {
                "id": "${tenant_id}",
                "compliance_zones": ["gdpr", "hipaa"],
                "service_tier": "enterprise",
            },
            "required_capabilities": ["analytics", "data_processing"],
            "preferred_providers": ["internal", "trusted_partners"],
            "cache_duration": 0,
            "health_check": False,
            "load_balancing": "round_robin",
        },
    }
    name = f"Service Discovery {uuid.uuid4().hex[:6]}"
    created = http.post("/api/workflows", json={"name": name, "nodes": [discover]})
    assert created.status_code == 200, created.text
    outputs = _run(http, created.json()["workflow_id"])["outputs"]["discover_services"]
    assert service_id in [s["id"] for s in outputs["services"]], outputs
