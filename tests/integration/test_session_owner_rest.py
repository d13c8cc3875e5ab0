"""Sessions belong to the credential that created them, over REST through a
real Envoy: another key of the same tenant gets the 404 of a missing
session on every path that names it, the Kailash execute shortcut included."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from ..conftest import ADMIN_HEADERS, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http, timeout=30) as client:
        yield client


def _key(http: httpx.Client, tenant: str) -> dict[str, str]:
    response = http.post("/api/keys", json={"tenant": tenant, "roles": ["user"]}, headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return {"x-api-key": response.json()["key"]}


def _missing(response: httpx.Response, session_id: str) -> None:
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["message"] == f"session {session_id!r} does not exist or has expired", body
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
