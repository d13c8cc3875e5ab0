"""Kailash's enterprise and durability routes through a real Envoy: `/enterprise/features` (k101),
`/enterprise/health` (k106), `/enterprise/resources` (k105), `/durability/status` (k119),
`/durability/requests` and `/dashboard` (k109), and `GET /workflows` as Kailash's map keyed by the
name its routes take (k083, k086, k111)."""

from __future__ import annotations

import uuid

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KAILASH_FEATURES = {
    "request_durability",
    "resource_registry",
    "secret_management",
    "async_workflows",
    "health_monitoring",
    "resource_resolution",
    "enterprise_security",
}


def _tenant_key(http: httpx.Client) -> dict[str, str]:
    """A user key of a tenant of its own, which has nothing yet."""
    made = http.post("/api/keys", json={"tenant": f"k-{uuid.uuid4().hex[:8]}", "roles": ["user"]})
    assert made.status_code == 200, made.text
    return {"x-api-key": made.json()["key"]}


def test_k101_enterprise_features_are_public(anonymous: httpx.Client) -> None:
    answer = anonymous.get("/enterprise/features")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert all(body[k] is True for k in ("durability", "async_execution", "resource_management", "health_checks"))
    assert body["secret_management"] is True and set(body["features"]) >= KAILASH_FEATURES
    assert body["features"] == anonymous.get("/").json()["enterprise"]["features"]


def test_k106_enterprise_health_names_kailashs_components_without_counts(anonymous: httpx.Client) -> None:
    answer = anonymous.get("/enterprise/health")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["server_type"] == "enterprise_workflow_server" and body["timestamp"] and body["status"] == "healthy"
    assert set(body["components"]) == {"base_server", "resources", "async_runtime", "secret_manager"}
    assert all(c["status"] == "healthy" and not c.get("details") for c in body["components"].values())


def test_k105_enterprise_resources_are_the_callers(http: httpx.Client, anonymous: httpx.Client) -> None:
    assert anonymous.get("/enterprise/resources").status_code == 401
    assert http.get("/enterprise/resources").status_code == 200
    missing = http.get("/enterprise/resources/nonexistent")
    assert missing.status_code == 404 and "nonexistent" in missing.text


def test_k109_dashboard_and_durable_requests_need_a_credential(http: httpx.Client, anonymous: httpx.Client) -> None:
    for path in ("/dashboard", "/durability/requests", "/durability/status"):
        assert anonymous.get(path).status_code == 401, path
    dashboard = http.get("/dashboard")
    assert dashboard.status_code == 200 and dashboard.json()["console"] == "/console/"
    # A tenant with no execution in flight: an empty map, as Kailash's with no request in flight.
    assert http.get("/durability/requests", headers=_tenant_key(http)).json() == {}
    in_flight = http.get("/durability/requests").json()
    assert all(r["state"] in ("pending", "running") and r["workflow_id"] for r in in_flight.values())


def test_k119_durability_status_counts_the_log_and_the_store(http: httpx.Client) -> None:
    # One logged event at least: creating a session publishes session.created.
    assert http.post("/api/sessions", json={"user_id": "k119"}).status_code == 200
    answer = http.get("/durability/status")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["enabled"] is True and body["opt_in"] is False
    assert {"checkpoint_stats", "deduplication_stats", "event_store_stats"} <= set(body)
    assert (
        body["event_store_stats"]["event_count"] > 0 and body["event_count"] == body["event_store_stats"]["event_count"]
    )
    assert body["checkpoint_count"] == sum(body["checkpoint_stats"]["by_state"].values())
    # A tenant's user counts its own tenant: a new one has no executions and no events yet.
    fresh = http.get("/durability/status", headers=_tenant_key(http)).json()
    assert (fresh["checkpoint_count"], fresh["event_count"], fresh["active_requests"]) == (0, 0, 0)


def test_k083_k086_k111_workflows_are_a_map_keyed_by_id(http: httpx.Client, anonymous: httpx.Client) -> None:
    assert anonymous.get("/workflows").status_code == 401
    key = _tenant_key(http)
    empty = http.get("/workflows", headers=key)
    assert empty.status_code == 200 and empty.json() == {}
    workflow = {
        "name": "Tenant Isolation Workflow",
        "description": "A registered workflow",
        "nodes": [{"id": "n", "type": "PythonCodeNode", "parameters": {"code": "result = {'ran': True}"}}],
    }
    made = http.post("/api/workflows", json=workflow, headers=key)
    assert made.status_code == 200, made.text
    workflow_id = made.json()["workflow_id"]
    listed = http.get("/workflows", headers=key).json()
    assert listed == {
        workflow_id: {
            "type": "embedded",
            "name": "Tenant Isolation Workflow",
            "description": "A registered workflow",
            "version": "1",
            "tags": [],
            "endpoints": [f"/workflows/{workflow_id}/execute", f"/{workflow_id}/execute"],
        }
    }
    # Each endpoint runs it.
    ran = http.post(listed[workflow_id]["endpoints"][0], json={"inputs": {}}, headers=key)
    assert ran.status_code == 200 and ran.json()["outputs"]["n"]["result"] == {"ran": True}
