"""Sessions belong to the credential that created them, over REST through a
real Envoy: another key of the same tenant gets the 404 of a missing
session on every path that names it, the Kailash execute shortcut included,
and the 404 of a missing execution or workflow for what ran or was made in
it; lists and the event stream leave those out."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from ..conftest import ADMIN_HEADERS, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http, timeout=30) as client:
        yield client


def _key(http: httpx.Client, tenant: str, role: str = "user") -> dict[str, str]:
    response = http.post("/api/keys", json={"tenant": tenant, "roles": [role]}, headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return {"x-api-key": response.json()["key"]}


def _missing(response: httpx.Response, session_id: str) -> None:
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["message"] == "session does not exist or has expired", (session_id, body)
    assert not body["details"][0].get("metadata") and session_id not in response.text
    assert body["details"][0]["reason"] == "SESSION_NOT_FOUND"


def test_another_key_of_the_tenant_gets_404_for_a_session_on_every_path(http: httpx.Client) -> None:
    tenant = f"owners-{uuid.uuid4().hex[:8]}"
    ada, bob = _key(http, tenant), _key(http, tenant)
    session_id = http.post("/api/sessions", json={"user_id": "u"}, headers=ada).json()["session_id"]
    workflow = {"name": "add", "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = 1"}}]}
    assert http.post("/api/workflows", json=workflow, headers=ada).status_code == 200
    run = {"session_id": session_id, "inputs": {}}

    _missing(http.get(f"/api/sessions/{session_id}", headers=bob), session_id)
    _missing(http.delete(f"/api/sessions/{session_id}", headers=bob), session_id)
    assert session_id not in http.get("/api/sessions", headers=bob).text
    _missing(http.post("/workflows/add/execute", json=run, headers=bob), session_id)
    _missing(http.post("/api/executions", json={"workflow_id": "add", **run}, headers=bob), session_id)
    _missing(http.get("/events", params={"session_id": session_id, "after_id": "0"}, headers=bob), session_id)

    assert http.get(f"/api/sessions/{session_id}", headers=ada).status_code == 200
    done = http.post("/workflows/add/execute", json=run, headers=ada)
    assert done.status_code == 200 and done.json()["session_id"] == session_id, done.text


def _gone(response: httpx.Response, what: str, ident: str) -> None:
    """The 404 of an execution or workflow that never existed."""
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["message"] == f"{what} {ident!r} does not exist", body
    assert body["details"][0]["reason"] == f"{what.upper()}_NOT_FOUND"


def _ndjson_until(
    http: httpx.Client, headers: dict[str, str], last: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """GET /events from the start, as NDJSON, up to the first event `last` accepts (within 20 s)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    with http.stream("GET", "/events", params={"after_id": "0"}, headers=headers, timeout=20) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"the stream never got there: {events[-5:]}"
            if line.strip():
                events.append(json.loads(line))
                if last(events[-1]):
                    break
    return events


def test_what_runs_in_a_session_is_404_to_another_key_of_the_tenant(http: httpx.Client) -> None:
    tenant = f"contents-{uuid.uuid4().hex[:8]}"
    ada, bob, boss = _key(http, tenant), _key(http, tenant), _key(http, tenant, "admin")
    session_id = http.post("/api/sessions", json={"user_id": "u"}, headers=ada).json()["session_id"]
    code = {"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = 41 + 1"}}
    assert http.post("/api/workflows", json={"name": "open", "nodes": [code]}, headers=ada).status_code == 200
    private = {"name": "private", "session_id": session_id, "nodes": [code]}
    assert http.post("/api/workflows", json=private, headers=ada).status_code == 200
    inside = http.post("/workflows/open/execute", json={"session_id": session_id}, headers=ada).json()
    outside = http.post("/workflows/open/execute", json={}, headers=ada).json()
    assert inside["state"] == outside["state"] == "STATE_SUCCEEDED", inside
    inside_id = inside["execution_id"]

    _missing(http.get("/api/executions", params={"session_id": session_id}, headers=bob), session_id)
    _missing(http.get("/api/workflows", params={"session_id": session_id}, headers=bob), session_id)
    listed = http.get("/api/executions", headers=bob).json()["executions"]
    assert [e["execution_id"] for e in listed] == [outside["execution_id"]]
    assert [w["workflow_id"] for w in http.get("/api/workflows", headers=bob).json()["workflows"]] == ["open"]
    _gone(http.get(f"/api/executions/{inside_id}", headers=bob), "execution", inside_id)
    _gone(http.get(f"/api/executions/{inside_id}:watch", headers=bob), "execution", inside_id)
    _gone(http.post(f"/api/executions/{inside_id}:cancel", json={}, headers=bob), "execution", inside_id)
    _gone(http.get("/api/workflows/private", headers=bob), "workflow", "private")
    _gone(http.get("/api/schemas/workflows/private", headers=bob), "workflow", "private")
    _gone(http.post("/workflows/private/execute", json={}, headers=bob), "workflow", "private")
    _gone(http.delete("/api/workflows/private", headers=bob), "workflow", "private")
    his = http.post("/api/sessions", json={}, headers=bob).json()["session_id"]
    seen = _ndjson_until(http, bob, lambda e: e.get("session_id") == his)
    assert not [e for e in seen if e.get("session_id") == session_id or e.get("execution_id") == inside_id]
    assert any(e.get("execution_id") == outside["execution_id"] for e in seen), "the tenant's events still come"

    for who in (ada, boss):
        got = http.get(f"/api/executions/{inside_id}", headers=who).json()
        assert got["outputs"] == inside["outputs"] and got["session_id"] == session_id, got
        listed = http.get("/api/executions", params={"session_id": session_id}, headers=who).json()["executions"]
        assert [e["execution_id"] for e in listed] == [inside_id]
        assert http.get("/api/workflows/private", headers=who).json()["session_id"] == session_id
        events = _ndjson_until(http, who, lambda e: e.get("type") == "execution.completed")
        assert events[-1]["execution_id"] == inside_id and events[-1]["session_id"] == session_id
