"""The seed's WebSocket endpoint `/ws` through a real Envoy and server: a client subscribes with
Kailash names and gets the workflow's events as the seed's code reads them; credentials, sessions
and errors behave as on `GET /events`; the `flowport_token` cookie is a credential from this host's
pages only; and the seed's own browser code, unchanged, sees a workflow complete in Chromium."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SEED_EVENTS = ["workflow_started", "workflow_completed", "system_error"]


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http, timeout=30, headers=ADMIN_HEADERS) as client:
        yield client


def _ws_url(stack: Stack, query: str = "") -> str:
    return f"ws://127.0.0.1:{stack.settings.http_port}/ws" + (f"?{query}" if query else "")


def _open(stack: Stack, query: str, headers: dict[str, str] | None = None) -> ClientConnection:
    return connect(_ws_url(stack, query), additional_headers=headers or ADMIN_HEADERS, open_timeout=10)


def _receive(ws: ClientConnection) -> dict[str, Any]:
    message = ws.recv(timeout=10)
    assert isinstance(message, str), message
    parsed: dict[str, Any] = json.loads(message)
    return parsed


def _session(http: httpx.Client, headers: dict[str, str] | None = None) -> str:
    response = http.post("/api/sessions", json={"user_id": "ws"}, headers=headers or ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return str(response.json()["session_id"])


def _run_workflow(http: httpx.Client, session_id: str) -> str:
    """A one-node workflow made and run (waited for) in `session_id`; its workflow_id."""
    name = f"ws_{uuid.uuid4().hex[:8]}"
    code = {"type": "PythonCodeNode", "id": "a", "config": {"code": "result = 1"}}
    made = http.post("/api/workflows", params={"session_id": session_id}, json={"name": name, "nodes": [code]})
    assert made.status_code == 200, made.text
    workflow_id = str(made.json()["workflow_id"])
    ran = http.post(f"/workflows/{workflow_id}/execute", params={"session_id": session_id}, json={"inputs": {}})
    assert ran.status_code == 200, ran.text
    return workflow_id


def _user_key(http: httpx.Client) -> dict[str, str]:
    response = http.post("/api/keys", json={"tenant": "default", "roles": ["user"]})
    assert response.status_code == 200, response.text
    return {"x-api-key": response.json()["key"]}


def _closed_with_error(ws: ClientConnection, code: str, close_code: int) -> None:
    """The next frame is the error frame with `code`, then the connection closes with `close_code`."""
    error = _receive(ws)
    assert error["type"] == "error" and error["code"] == code and error["error"], error
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == close_code


def test_a_subscribed_client_gets_the_workflow_started_then_completed(stack: Stack, http: httpx.Client) -> None:
    session_id = _session(http)
    with _open(stack, f"session_id={session_id}") as ws:
        ws.send(json.dumps({"type": "subscribe", "events": SEED_EVENTS}))
        assert _receive(ws) == {"type": "subscribed", "events": SEED_EVENTS}
        workflow_id = _run_workflow(http, session_id)
        started, completed = _receive(ws), _receive(ws)
    for frame, kind in ((started, "workflow_started"), (completed, "workflow_completed")):
        assert frame["type"] == kind and frame["event"]["type"] == kind, frame
        assert frame["workflow_id"] == workflow_id and frame["event"]["workflow_id"] == workflow_id
        assert frame["session_id"] == session_id and frame["id"] == frame["event"]["id"]
        assert isinstance(frame["timestamp"], float) and frame["timestamp"] > 0
    assert int(completed["id"]) > int(started["id"])


def _refused(stack: Stack, query: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a handshake refused before the upgrade."""
    with pytest.raises(InvalidStatus) as refused:
        connect(_ws_url(stack, query), additional_headers=headers, open_timeout=10)
    response = refused.value.response
    assert response.headers["content-type"] == "application/json"
    return response.status_code, json.loads(response.body)


def test_no_credential_or_a_bad_one_is_refused_at_the_handshake(stack: Stack, http: httpx.Client) -> None:
    assert _refused(stack, "", {})[0] == 401
    # A key that is no key: the stream's UNAUTHENTICATED, as the 401 of GET /events, before any upgrade.
    status, body = _refused(stack, "after_id=0", {"x-api-key": "fpk_not-a-key"})
    assert (status, body["code"]) == (401, 16) and "fpk_not-a-key" not in json.dumps(body)
    assert http.get("/events", params={"after_id": "0"}, headers={"x-api-key": "fpk_not-a-key"}).status_code == 401


def test_a_key_revoked_while_connected_ends_the_socket_with_an_error(stack: Stack, http: httpx.Client) -> None:
    made = http.post("/api/keys", json={"tenant": "default", "roles": ["user"]})
    assert made.status_code == 200, made.text
    with _open(stack, "types=session.created", {"x-api-key": made.json()["key"]}) as ws:
        ws.send("ping")
        assert ws.recv(timeout=10) == "pong"
        revoked = http.post(f"/api/keys/{made.json()['api_key']['key_id']}:revoke", json={})
        assert revoked.status_code == 200, revoked.text
        _closed_with_error(ws, "UNAUTHENTICATED", 1008)


def test_another_credential_cannot_stream_a_session_it_may_not_use(stack: Stack, http: httpx.Client) -> None:
    owner, other = _user_key(http), _user_key(http)
    session_id = _session(http, owner)
    # As on GET /events: another credential's session is missing.
    events = http.get("/events", params={"session_id": session_id}, headers=other)
    assert events.status_code == 404
    # Refused before the upgrade with the same status, words and reason.
    status, body = _refused(stack, f"session_id={session_id}&after_id=0", other)
    assert (status, body["code"], body["message"]) == (404, 5, events.json()["message"])
    assert body["details"][0]["reason"] == events.json()["details"][0]["reason"] == "SESSION_NOT_FOUND"
    # Its owner streams it: the replay from the start holds the session's creation.
    with _open(stack, f"session_id={session_id}&after_id=0&types=session.created", owner) as ws:
        assert _receive(ws)["session_id"] == session_id


def test_ping_is_answered_and_bad_messages_leave_the_connection_open(stack: Stack) -> None:
    with _open(stack, "types=session.created") as ws:
        ws.send("ping")
        assert ws.recv(timeout=10) == "pong"
        ws.send(json.dumps({"type": "ping"}))
        assert _receive(ws) == {"type": "pong"}
        ws.send("{not json")
        assert _receive(ws)["type"] == "error"
        # Other text is echoed, as Kailash's workflow servers do; too long, only an error that quotes none of it.
        ws.send("Hello")
        assert ws.recv(timeout=10) == "Echo: Hello"
        ws.send("x" * 4097)
        too_long = _receive(ws)
        assert too_long["type"] == "error" and "x" * 10 not in too_long["error"]
        ws.send(json.dumps({"type": "subscribe", "events": "workflow_started"}))
        assert "events" in _receive(ws)["error"]
        ws.send(json.dumps({"type": "dance"}))
        assert "dance" in _receive(ws)["error"]
        # Still open, and still serving subscriptions: ten in a row, not an eleventh.
        for _ in range(10):
            ws.send(json.dumps({"type": "subscribe", "event_types": ["system_error"]}))
            assert _receive(ws) == {"type": "subscribed", "events": ["system_error"]}
        ws.send(json.dumps({"type": "subscribe", "events": ["session.created"]}))
        assert _receive(ws)["code"] == "RESOURCE_EXHAUSTED"
        ws.send("ping")
        assert ws.recv(timeout=10) == "pong"


def test_a_client_flooding_messages_is_closed_with_1008(stack: Stack) -> None:
    """Messages on an open socket pass no rate limit of Envoy's: past its bucket (50, then 10 a
    second) the bridge closes the connection instead of answering on."""
    with _open(stack, "types=session.created") as ws:
        # The server may close while the pings are still being sent.
        with contextlib.suppress(ConnectionClosed):
            for _ in range(200):
                ws.send("ping")
        answers, errors = 0, []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = ws.recv(timeout=10)
                if message == "pong":
                    answers += 1
                else:
                    errors.append(json.loads(message))
    assert 50 <= answers < 200
    assert [error["code"] for error in errors] == ["RESOURCE_EXHAUSTED"], errors
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_the_cookie_is_a_credential_from_this_hosts_pages_only(stack: Stack, http: httpx.Client) -> None:
    session_id = _session(http)
    query = f"session_id={session_id}&after_id=0&types=session.created"
    same_origin = f"http://127.0.0.1:{stack.settings.http_port}"
    cookie = {"Cookie": f"theme=dark; flowport_token={ADMIN_KEY}"}
    with _open(stack, query, {**cookie, "Origin": same_origin}) as ws:
        assert _receive(ws)["session_id"] == session_id
    # A page of another site opening the socket in the user's browser gets nothing.
    with pytest.raises(InvalidStatus) as refused:
        connect(_ws_url(stack, query), additional_headers={**cookie, "Origin": "http://evil.example"}, open_timeout=10)
    assert refused.value.response.status_code == 403
    # The same holds for the SSE stream, which a cross-site page could read no more than open.
    refused_sse = httpx.get(
        f"{stack.http}/events",
        params={"after_id": "0"},
        headers={**cookie, "Origin": "http://evil.example"},
        timeout=10,
    )
    assert refused_sse.status_code == 403 and refused_sse.json()["code"] == 7


# The seed's browser code (enterprise-gateway-patterns.md), verbatim but for the gateway's address.
SEED_CODE = """
async function connectToGateway(sessionId) {
    const ws = new WebSocket(`ws://localhost:8000/ws?session_id=${sessionId}`);

    ws.onopen = () => {
        console.log('Connected to enterprise gateway');

        // Subscribe to workflow events
        ws.send(JSON.stringify({
            type: 'subscribe',
            events: ['workflow_started', 'workflow_completed', 'system_error']
        }));
    };

    ws.onmessage = (event) => {
        const data = JSON.parse(event.data);

        switch(data.type) {
            case 'workflow_completed':
                updateWorkflowStatus(data.workflow_id, 'completed');
                break;
            case 'system_error':
                showSystemError(data.error);
                break;
            default:
                console.log('Gateway event:', data);
        }
    };

    ws.onerror = (error) => {
        console.error('Gateway connection error:', error);
        // Implement reconnection logic
        setTimeout(() => connectToGateway(sessionId), 5000);
    };

    return ws;
}
"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (the README's test command)")
def test_the_seeds_browser_code_sees_a_workflow_complete(stack: Stack, http: httpx.Client) -> None:
    from playwright.sync_api import sync_playwright

    session_id = _session(http)
    code = SEED_CODE.replace("localhost:8000", f"127.0.0.1:{stack.settings.http_port}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            assert page.goto(f"{stack.http}/health") is not None  # a page of the gateway's origin
            page.evaluate(f"document.cookie = 'flowport_token={ADMIN_KEY}; path=/; SameSite=Strict'")
            page.evaluate(
                "window.calls = []; window.updateWorkflowStatus = (id, status) => calls.push([id, status]);"
                "window.showSystemError = (error) => calls.push(['error', error]);" + code + "\n"
                f"connectToGateway({json.dumps(session_id)}).then(ws => {{ window.gateway = ws; }});"
            )
            page.wait_for_function("window.gateway && window.gateway.readyState === WebSocket.OPEN", timeout=10_000)
            workflow_id = _run_workflow(http, session_id)
            page.wait_for_function(
                f"window.calls.some(c => c[0] === {json.dumps(workflow_id)} && c[1] === 'completed')", timeout=10_000
            )
            assert page.evaluate("window.calls") == [[workflow_id, "completed"]], errors
        finally:
            browser.close()
