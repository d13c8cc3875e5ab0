"""Kailash clients through a real Envoy and server: `GET /events` takes
`event_types` (comma-separated, repeated, or both) as well as `types`, and
a webhook registered with a Content-Type header is accepted."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from ..conftest import ADMIN_HEADERS, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WANTED = {"session.created", "workflow.created"}


@pytest.fixture
def http(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.http, timeout=30, headers=ADMIN_HEADERS)


def _make_workflow_then_session(http: httpx.Client) -> tuple[str, str]:
    """A new workflow, a session made and deleted, then a session whose creation ends the stream read."""
    name = f"alias_{uuid.uuid4().hex[:8]}"
    code = {"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}}
    assert http.post("/api/workflows", json={"name": name, "nodes": [code]}).status_code == 200
    # A session.deleted in between: an event of a type the streams do not ask for.
    doomed = http.post("/api/sessions", json={"user_id": name}).json()["session_id"]
    assert http.delete(f"/api/sessions/{doomed}").status_code == 200
    response = http.post("/api/sessions", json={"user_id": name})
    assert response.status_code == 200, response.text
    return name, response.json()["session_id"]


def _events_until_session(http: httpx.Client, params: Any, session_id: str) -> list[dict[str, Any]]:
    """NDJSON events of /events?<params> from the start, up to the creation of `session_id` (within 20 s)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    with http.stream("GET", "/events", params=params, timeout=20) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"the stream never got there: {events[-5:]}"
            if line.strip():
                event = json.loads(line)
                if event.get("type") == "heartbeat":
                    continue
                events.append(event)
                if event.get("type") == "session.created" and event.get("session_id") == session_id:
                    return events
    raise AssertionError(f"the stream ended: {events[-5:]}")


@pytest.mark.parametrize(
    "params",
    [
        [("event_types", "session.created,workflow.created")],
        [("event_types", "session.created"), ("event_types", "workflow.created")],
        [("event_types", "session.created,workflow.*")],
        [("types", "session.created"), ("event_types", "workflow.created")],
    ],
    ids=["comma-separated", "repeated", "family", "with-types"],
)
def test_event_types_is_an_alias_of_types(http: httpx.Client, params: list[tuple[str, str]]) -> None:
    name, session_id = _make_workflow_then_session(http)
    events = _events_until_session(http, [("after_id", "0"), *params], session_id)
    # The stack is shared: earlier tests left events of every type in the log. `workflow.*`
    # asks for the whole family (workflow.deleted included), the other forms for two types.
    family = any(value.endswith("workflow.*") for _, value in params)
    unwanted = {e["type"] for e in events if e["type"] not in WANTED}
    assert all(kind.startswith("workflow.") for kind in unwanted) if family else not unwanted, unwanted
    assert any(e["type"] == "workflow.created" and name in json.dumps(e) for e in events)


def test_too_many_event_types_is_400_naming_the_parameter(http: httpx.Client) -> None:
    many = ",".join(f"t{i}.created" for i in range(51))
    response = http.get("/events", params={"event_types": many})
    assert response.status_code == 400, response.text
    body = response.json()
    assert "at most 50 types" in body["message"]
    assert "event_types" in json.dumps(body["details"])
    assert many not in response.text


def test_a_webhook_with_content_type_is_accepted_and_the_header_dropped(http: httpx.Client) -> None:
    webhook = {"url": "https://example.com/hook", "headers": {"Content-Type": "text/plain", "X-Team": "a"}}
    response = http.post("/api/webhooks", json=webhook)
    assert response.status_code == 200, response.text
    assert set(response.json()["headers"]) == {"X-Team"}
