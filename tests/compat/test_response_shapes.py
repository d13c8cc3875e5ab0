"""The JSON shapes Kailash clients read, through a real Envoy: the seed's `get_gateway_stats()`
over `/api/stats` (every key there, every figure a number), `features` as a map, the
`authentication` and `websockets` health components, `active` sessions, list `total`s that
count only what the caller may list, executions' `status` and `progress`, and the messages of
Kailash's DELETE routes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from ..conftest import ADMIN_HEADERS, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _user_key(http: httpx.Client, tenant: str) -> dict[str, str]:
    made = http.post("/api/keys", json={"tenant": tenant, "roles": ["user"]})
    assert made.status_code == 200, made.text
    return {"x-api-key": made.json()["key"]}


def _workflow(name: str, code: str = "result = 7") -> dict[str, object]:
    return {"name": name, "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": code}}]}


def get_gateway_stats(stats_response: dict[str, Any]) -> dict[str, Any]:
    """The seed's monitoring code (enterprise-gateway-patterns.md), as written there."""
    return {
        "active_sessions": stats_response["sessions"]["active"],
        "total_requests": stats_response["requests"]["total"],
        "average_response_time": stats_response["performance"]["avg_response_time"],
        "error_rate": stats_response["errors"]["rate"],
        "uptime": stats_response["system"]["uptime"],
        "websocket_connections": stats_response["realtime"]["websocket_count"],
        "sse_connections": stats_response["realtime"]["sse_count"],
        "webhook_deliveries": stats_response["webhooks"]["delivered"],
        "failed_auth_attempts": stats_response["security"]["failed_auth"],
        "rate_limit_hits": stats_response["security"]["rate_limits"],
        "db_connections": stats_response["database"]["active_connections"],
        "db_query_time": stats_response["database"]["avg_query_time"],
    }


def _numbers(value: object, path: str = "") -> list[str]:
    """Paths of the figures under `value` that are not JSON numbers (strings, say)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _numbers(v, f"{path}.{k}")]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [path]
    return []


def test_the_seeds_stats_code_runs_and_every_figure_is_a_number(http: httpx.Client) -> None:
    assert http.post("/api/sessions", json={"user_id": "shapes"}).status_code == 200
    stats = http.get("/api/stats").json()
    figures = get_gateway_stats(stats)
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in figures.values()), figures
    assert figures["total_requests"] >= 1 and figures["active_sessions"] >= 1
    counters = {k: stats[k] for k in ("sessions", "requests", "executions", "webhooks", "security", "database")}
    assert _numbers(counters) == [], counters
    assert stats["sessions"]["created"] >= stats["sessions"]["active"] >= 1
    assert stats["uptime_seconds"] >= 0 and isinstance(stats["uptime_seconds"], int | float)
    assert stats["gateway"]["name"] == "flowport" and stats["gateway"]["version"]
    assert stats["gateway"]["requests_processed"] >= 1
    assert stats["agent_ui"]["active_sessions"] == stats["sessions"]["active"]
    assert stats["schema_registry"]["node_types"] == http.get("/api/schemas/nodes").json()["total"] > 0


def test_websocket_count_counts_open_ws_connections(http: httpx.Client, stack: Stack) -> None:
    def count() -> int:
        return int(http.get("/api/stats").json()["realtime"]["websocket_count"])

    before = count()
    url = f"ws://127.0.0.1:{stack.settings.http_port}/ws"
    with connect(url, additional_headers=ADMIN_HEADERS, open_timeout=10):
        deadline = time.monotonic() + 10
        while count() != before + 1:  # the bridge opens its stream just after the handshake
            assert time.monotonic() < deadline, (before, count())
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while count() != before:
        assert time.monotonic() < deadline, (before, count())
        time.sleep(0.1)


def test_features_are_a_map_beside_the_native_list(stack: Stack) -> None:
    answer = httpx.get(f"{stack.http}/", timeout=30)  # public, as Kailash's is
    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert {"name": "sessions", "enabled": True, "detail": ""} in info["features"]
    flags = info["feature_flags"]
    assert flags["sessions"] is True and flags["real_time"] is True and flags["webhooks"] is True
    assert flags["ai_chat"] is False
    assert info["status"] == "healthy" and info["uptime_seconds"] >= 0


def test_health_reports_authentication_and_websockets_without_counts(stack: Stack) -> None:
    health = httpx.get(f"{stack.http}/health", timeout=30).json()
    components = health["components"]
    assert components["authentication"]["status"] == "healthy", components["authentication"]
    assert components["authentication"]["last_check"]
    assert components["websockets"]["status"] == "healthy"
    assert "active_connections" not in str(components["websockets"])
    for name in ("agent_ui", "realtime", "schema_registry"):  # Kailash's own components
        assert components[name]["status"] == "healthy", (name, components[name])
    assert health["uptime_seconds"] >= health["uptime"]


def test_sessions_are_active_and_delete_says_closed(http: httpx.Client) -> None:
    created = http.post("/api/sessions", json={"user_id": "shapes"}).json()
    assert created["active"] is True
    session_id = created["session_id"]
    assert http.get(f"/api/sessions/{session_id}").json()["active"] is True
    closed = http.delete(f"/api/sessions/{session_id}")
    assert closed.status_code == 200 and closed.json() == {"message": "Session closed"}, closed.text
    assert http.get(f"/api/sessions/{session_id}").status_code == 404


def test_list_totals_count_only_what_the_caller_may_list(http: httpx.Client) -> None:
    tenant = f"rs{uuid.uuid4().hex[:6]}"
    admin = {**ADMIN_HEADERS, "x-flowport-act-as-tenant": tenant}
    owner, stranger = _user_key(http, tenant), _user_key(http, tenant)
    mine = [http.post("/api/sessions", json={"user_id": "o"}, headers=owner).json()["session_id"] for _ in range(3)]
    theirs = http.post("/api/sessions", json={"user_id": "s"}, headers=stranger).json()["session_id"]
    page = http.get("/api/sessions", params={"page_size": 2}, headers=owner).json()
    assert len(page["sessions"]) == 2 and page["total"] == 3, page
    assert http.get("/api/sessions", headers=stranger).json()["total"] == 1
    for name, session_id, headers in (("wo", mine[0], owner), ("ws", theirs, stranger)):
        made = http.post("/api/workflows", params={"session_id": session_id}, json=_workflow(name), headers=headers)
        assert made.status_code == 200, made.text
        ran = http.post(
            "/api/executions", json={"workflow_id": name, "session_id": session_id, "wait": True}, headers=headers
        )
        assert ran.status_code == 200, ran.text
    assert http.get("/api/workflows", headers=owner).json()["total"] == 1
    assert http.get("/api/executions", headers=owner).json()["total"] == 1
    assert http.get("/api/executions", headers=stranger).json()["total"] == 1
    # An admin acting for the tenant sees both credentials' runs.
    assert http.get("/api/executions", headers=admin).json()["total"] == 2
    listed = http.get("/workflows", headers=owner)
    assert listed.status_code == 200 and [w["name"] for w in listed.json().values()] == ["wo"], listed.text


def test_executions_have_kailashs_status_and_progress(http: httpx.Client) -> None:
    name = f"rs_{uuid.uuid4().hex[:8]}"
    assert http.post("/api/workflows", json=_workflow(name)).status_code == 200
    done = http.post("/api/executions", json={"workflow_id": name, "wait": True}).json()
    assert done["state"] == "STATE_SUCCEEDED" and done["status"] == "completed" and done["progress"] == 100
    assert http.get(f"/api/executions/{done['execution_id']}").json()["status"] == "completed"
    slow = f"rs_{uuid.uuid4().hex[:8]}"
    sleeper = _workflow(slow, "import time\ntime.sleep(30)\nresult = 1")
    assert http.post("/api/workflows", json=sleeper).status_code == 200
    started = http.post("/api/executions", json={"workflow_id": slow}).json()
    assert started["status"] in ("started", "running"), started
    cancelled = http.delete(f"/api/executions/{started['execution_id']}")
    assert cancelled.status_code == 200, cancelled.text
    deadline = time.monotonic() + 30
    while (got := http.get(f"/api/executions/{started['execution_id']}").json())["status"] != "cancelled":
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert got["state"] == "STATE_CANCELLED"


def test_kailash_parameters_are_accepted_where_kailash_sends_them(http: httpx.Client) -> None:
    mine, other = (http.post("/api/sessions", json={"user_id": "k"}).json()["session_id"] for _ in range(2))
    name = f"rs_{uuid.uuid4().hex[:8]}"
    made = http.post("/api/workflows", json={**_workflow(name), "metadata": {"author": "test"}})
    assert made.status_code == 200 and made.json()["metadata"] == {"author": "test"}, made.text
    overridden = {"workflow_id": name, "config_overrides": {"a": {"code": "result = 8"}}}
    assert http.post("/api/executions", json=overridden).status_code == 400  # refused, never ignored
    body = {"workflow_id": name, "session_id": mine, "wait": True, "config_overrides": {}}
    run = http.post("/api/executions", json=body).json()
    path = f"/api/executions/{run['execution_id']}"
    assert http.delete(path, params={"session_id": other}).status_code == 404
    assert http.delete(path, params={"session_id": mine}).json()["status"] == "completed"
    node = http.get("/api/schemas/nodes/PythonCodeNode").json()
    assert node["schema"]["parameters"] == node["config_schema"] and node["schema"]["category"] == node["category"]
    assert "schema" not in http.get("/api/schemas/nodes").json()["node_schemas"][0]
    with http.stream("GET", "/events", params={"user_id": "k", "session_id": mine}) as stream:
        assert stream.status_code == 200


def test_recent_events_are_newest_first_and_only_the_callers(http: httpx.Client) -> None:
    tenant = f"re{uuid.uuid4().hex[:6]}"
    admin = {**ADMIN_HEADERS, "x-flowport-act-as-tenant": tenant}
    owner, stranger = _user_key(http, tenant), _user_key(http, tenant)
    mine = http.post("/api/sessions", json={"user_id": "o"}, headers=owner).json()["session_id"]
    theirs = http.post("/api/sessions", json={"user_id": "s"}, headers=stranger).json()["session_id"]
    name = f"re_{uuid.uuid4().hex[:8]}"
    assert http.post("/api/workflows", json=_workflow(name), headers=owner).status_code == 200
    ran = http.post("/api/executions", json={"workflow_id": name, "session_id": mine, "wait": True}, headers=owner)
    assert ran.status_code == 200, ran.text

    seen = http.get("/api/events/recent", headers=owner).json()
    sessions = {e["session_id"] for e in seen["events"]}
    assert mine in sessions and theirs not in sessions, seen
    ids = [int(e["id"]) for e in seen["events"]]
    assert ids == sorted(ids, reverse=True) and seen["total"] == len(ids)
    assert {e["session_id"] for e in http.get("/api/events/recent", headers=admin).json()["events"]} >= {mine, theirs}
    assert http.get("/api/events/recent", params={"session_id": theirs}, headers=owner).status_code == 404

    two = http.get("/api/events/recent", params={"count": 2}, headers=admin).json()
    assert len(two["events"]) == 2 and two["next_page_token"], two
    older = http.get("/api/events/recent", params={"count": 2, "page_token": two["next_page_token"]}, headers=admin)
    assert int(older.json()["events"][0]["id"]) < int(two["events"][-1]["id"]), older.text
    done = http.get(
        "/api/events/recent",
        params={"execution_id": ran.json()["execution_id"], "event_types": "workflow.completed,execution.started"},
        headers=owner,
    ).json()["events"]
    assert [e["type"] for e in done] == ["workflow.completed", "execution.started"], done


def test_metrics_come_through_the_front_door_for_admins_only(http: httpx.Client, stack: Stack) -> None:
    text = http.get("/metrics")
    assert text.status_code == 200, text.text
    assert text.headers["content-type"].startswith("text/plain")
    assert "flowport_rpc_requests_total" in text.text
    user = _user_key(http, f"me{uuid.uuid4().hex[:6]}")
    assert httpx.get(f"{stack.http}/metrics", headers=user, timeout=30).status_code == 403
    assert httpx.get(f"{stack.http}/metrics", timeout=30).status_code == 401
