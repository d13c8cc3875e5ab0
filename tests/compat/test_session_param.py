"""`?session_id=` on the routes Kailash clients pass it to: accepted, recorded on a created
workflow, checked on reads (404 for a session the caller may not use), and a filter on an
execution's GET."""

from __future__ import annotations

import uuid

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _session(http: httpx.Client) -> str:
    response = http.post("/api/sessions", json={"user_id": "compat"})
    assert response.status_code == 200, response.text
    return str(response.json()["session_id"])


def _workflow(name: str) -> dict[str, object]:
    return {"name": name, "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 7"}}]}


def test_a_workflow_created_with_session_id_in_the_query_is_recorded_in_it(http: httpx.Client) -> None:
    session_id = _session(http)
    name = f"sq_{uuid.uuid4().hex[:8]}"
    created = http.post("/api/workflows", params={"session_id": session_id}, json=_workflow(name))
    assert created.status_code == 200, created.text
    assert created.json()["session_id"] == session_id
    listed = http.get("/api/workflows", params={"session_id": session_id}).json()["workflows"]
    assert [w["name"] for w in listed] == [name]
    for path in (f"/api/workflows/{name}", f"/api/schemas/workflows/{name}"):
        got = http.get(path, params={"session_id": session_id})
        assert got.status_code == 200, (path, got.text)


def test_query_and_body_sessions_must_agree(http: httpx.Client) -> None:
    first, second = _session(http), _session(http)
    body = {**_workflow(f"sq_{uuid.uuid4().hex[:8]}"), "session_id": first}
    response = http.post("/api/workflows", params={"session_id": second}, json=body)
    assert response.status_code == 400, response.text
    assert "session_id" in response.text and second not in response.text


def test_reads_with_an_unknown_session_are_404_naming_it(http: httpx.Client) -> None:
    name = f"sq_{uuid.uuid4().hex[:8]}"
    assert http.post("/api/workflows", json=_workflow(name)).status_code == 200
    run = http.post("/api/executions", json={"workflow_id": name, "wait": True})
    assert run.status_code == 200, run.text
    execution_id = run.json()["execution_id"]
    for path in (f"/api/workflows/{name}", f"/api/schemas/workflows/{name}", f"/api/executions/{execution_id}"):
        response = http.get(path, params={"session_id": "no-such-session"})
        assert response.status_code == 404, (path, response.text)
        assert "session" in response.json()["message"], response.text


def test_an_execution_read_with_its_session_is_found_and_with_another_is_not(http: httpx.Client) -> None:
    mine, other = _session(http), _session(http)
    name = f"sq_{uuid.uuid4().hex[:8]}"
    assert http.post("/api/workflows", json=_workflow(name)).status_code == 200
    run = http.post("/api/executions", params={"session_id": mine}, json={"workflow_id": name, "wait": True})
    assert run.status_code == 200, run.text
    execution_id = run.json()["execution_id"]
    found = http.get(f"/api/executions/{execution_id}", params={"session_id": mine})
    assert found.status_code == 200 and found.json()["session_id"] == mine, found.text
    assert http.get(f"/api/executions/{execution_id}", params={"session_id": other}).status_code == 404


def test_another_credentials_session_is_404_on_every_read(http: httpx.Client) -> None:
    """A user key naming a session another key of its tenant made learns nothing from it."""
    tenant = f"sq{uuid.uuid4().hex[:6]}"
    keys = []
    for _ in range(2):
        made = http.post("/api/keys", json={"tenant": tenant, "roles": ["user"]})
        assert made.status_code == 200, made.text
        keys.append({"x-api-key": made.json()["key"]})
    owner, stranger = keys
    session_id = http.post("/api/sessions", json={"user_id": "a"}, headers=owner).json()["session_id"]
    name = f"sq_{uuid.uuid4().hex[:8]}"
    made_wf = http.post("/api/workflows", params={"session_id": session_id}, json=_workflow(name), headers=owner)
    assert made_wf.status_code == 200, made_wf.text
    for path in ("/api/workflows", f"/api/schemas/workflows/{name}"):
        assert http.get(path, params={"session_id": session_id}, headers=owner).status_code == 200
        assert http.get(path, params={"session_id": session_id}, headers=stranger).status_code == 404
    # The stranger cannot create in it either.
    sneaky = http.post(
        "/api/workflows", params={"session_id": session_id}, json=_workflow(name + "x"), headers=stranger
    )
    assert sneaky.status_code == 404, sneaky.text
