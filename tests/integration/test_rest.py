"""REST and gRPC through a real Envoy in front of a real server (`flowport up`)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from flowport.clients import ApiError, Client
from flowport.v1 import gateway_pb2, session_pb2

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, Stack

pytestmark = pytest.mark.integration

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


@pytest.fixture
def http(stack: Stack) -> httpx.Client:
    with httpx.Client(base_url=stack.http, timeout=10, headers=ADMIN_HEADERS) as client:
        yield client


def test_session_crud_over_rest(http: httpx.Client) -> None:
    created = http.post("/api/sessions", json={"user_id": "ada", "metadata": {"team": "core", "n": 1}, "ttl": "120s"})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["user_id"] == "ada" and body["metadata"] == {"team": "core", "n": 1}
    assert "sessionId" not in body, "proto field names, not lowerCamelCase"
    session_id = body["session_id"]
    got = http.get(f"/api/sessions/{session_id}")
    assert got.status_code == 200 and got.json() == body
    listed = http.get("/api/sessions", params={"user_id": "ada", "page_size": 10})
    assert listed.status_code == 200
    assert [s["session_id"] for s in listed.json()["sessions"]] == [session_id]
    assert listed.json()["next_page_token"] == "", "defaults are printed"
    deleted = http.delete(f"/api/sessions/{session_id}")
    assert deleted.status_code == 200 and deleted.json() == {"message": "Session closed"}
    assert http.get(f"/api/sessions/{session_id}").status_code == 404


def test_unknown_session_is_404_with_a_json_status(http: httpx.Client) -> None:
    response = http.get("/api/sessions/ses_missing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    status = response.json()
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # Id-free, so every missing session gets the same bytes (the path says which was asked for).
    assert status["message"] == "session does not exist or has expired" and "ses_missing" not in response.text
    info = next(d for d in status["details"] if d["@type"] == ERROR_INFO)
    assert info["reason"] == "SESSION_NOT_FOUND" and info["domain"] == "flowport.dev"


def test_invalid_session_is_400_with_field_violations(http: httpx.Client) -> None:
    response = http.post("/api/sessions", json={"user_id": "u" * 300})
    assert response.status_code == 400
    details = response.json()["details"]
    bad_request = next(d for d in details if d["@type"].endswith("google.rpc.BadRequest"))
    assert bad_request["field_violations"][0]["field"] == "session.user_id"


def test_request_id_over_rest_replays_the_first_session(http: httpx.Client) -> None:
    first = http.post("/api/sessions?request_id=rest-1", json={"user_id": "idem"})
    again = http.post("/api/sessions?request_id=rest-1", json={"user_id": "idem"})
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    conflict = http.post("/api/sessions?request_id=rest-1", json={"user_id": "other"})
    assert conflict.status_code == 409


def test_health_json_has_the_seed_shape(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert set(body) >= {"status", "timestamp", "components", "version", "uptime"}
    assert isinstance(body["uptime"], int)
    database = body["components"]["database"]
    assert database["status"] == "healthy" and isinstance(database["latency"], float | int)
    # Public: statuses and latencies, no counts of anything (those are in /api/stats).
    assert not [name for name, c in body["components"].items() if c.get("details")], body["components"]


def test_info_and_stats_over_rest(http: httpx.Client) -> None:
    info = http.get("/").json()
    assert info["name"] == "flowport" and info["endpoints"]["sessions"] == "/api/sessions"
    stats = http.get("/api/stats")
    assert stats.status_code == 200
    assert int(stats.json()["requests"]["total"]) >= 1


def test_envoy_healthz_reports_the_upstream(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200


def test_unknown_paths_and_query_parameters_are_refused(http: httpx.Client) -> None:
    nothing = http.get("/api/nothing-here")
    assert nothing.status_code == 404 and "allow" not in nothing.headers
    assert nothing.json() == {
        "code": 5,
        "message": "no REST route has the path '/api/nothing-here' (the REST API is described at /openapi.json)",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "NOT_FOUND",
                "domain": "envoy.flowport.dev",
                "metadata": {},
            }
        ],
    }
    # A path some route has, with a method none of them takes: 405 naming the methods it takes.
    for method, path, allowed in (
        ("POST", "/api/sessions/abc", "DELETE, GET"),
        ("PUT", "/api/workflows", "GET, POST"),
        ("GET", "/api/executions/abc:cancel", "POST"),  # a custom verb: its routes only
        ("POST", "/api/executions/abc:cancel/", "DELETE, GET"),  # no verb after the last "/": an id
        ("DELETE", "/health", "GET"),
    ):
        refused = http.request(method, path)
        assert refused.status_code == 405 and refused.headers["allow"] == allowed, (method, path, refused.text)
        status = refused.json()
        assert status["code"] == 12 and status["message"].endswith(f"; it takes {allowed}"), status
        assert status["details"][0]["reason"] == "METHOD_NOT_ALLOWED"
        assert status["details"][0]["metadata"] == {"allow": allowed}
    # HEAD, which no route takes, alike (its answers have no body).
    head = http.head("/api/sessions/abc")
    assert head.status_code == 405 and head.headers["allow"] == "DELETE, GET" and head.content == b""
    assert http.head("/api/nothing-here").status_code == 404
    long = http.post("/api/sessions/" + "x" * 5000)
    assert long.status_code == 405 and len(long.content) < 1000 and "characters, cut" in long.text
    # A path of 30,000 characters without a ":" (Envoy's Lua once took seconds of CPU over each:
    # the client's timeout would end this call first).
    for path in ("/api/" + "a" * 30_000, "/api/sessions?user_id=1&userId=2&x=" + "a" * 30_000, "/api" + "/" * 30_000):
        assert http.get(path, timeout=5).status_code in (400, 404)
    # A number of 60,000 digits and then a letter in a body (Envoy's Lua once took about 30 s of
    # CPU over it: the client's timeout would end this call first), and a cookie of long spaces.
    digits = '{"user_id": ' + "1" * 60_000 + "x}"
    refused = http.post("/api/sessions", content=digits, headers={"content-type": "application/json"}, timeout=10)
    assert refused.status_code == 400 and len(refused.content) < 2000
    spaces = {"cookie": "flowport_token=x" + " " * 20_000 + "y; other=1"}
    with httpx.Client(base_url=str(http.base_url), timeout=5) as anonymous:  # the cookie is its credential
        assert anonymous.get("/events", headers=spaces).status_code == 401
    unknown = http.get("/api/sessions", params={"bogus": "1"})
    assert unknown.status_code == 400
    assert "bogus" in unknown.text


def test_grpc_through_envoy(stack: Stack) -> None:
    with Client(stack.envoy_target, api_key=ADMIN_KEY) as client:
        created = client.sessions.CreateSession(
            session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="grpc"))
        )
        got = client.sessions.GetSession(session_pb2.GetSessionRequest(session_id=created.session_id))
        assert got == created
        listed = client.sessions.ListSessions(session_pb2.ListSessionsRequest(user_id="grpc"))
        assert [s.session_id for s in listed.sessions] == [created.session_id]
        client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=created.session_id))
        with pytest.raises(grpc.RpcError) as caught:
            client.sessions.GetSession(session_pb2.GetSessionRequest(session_id=created.session_id))
        error = ApiError.from_rpc_error(caught.value)
        assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        assert client.gateway.GetHealth(gateway_pb2.GetHealthRequest()).status == "healthy"


def test_rest_and_grpc_see_the_same_data(stack: Stack, http: httpx.Client) -> None:
    created = http.post("/api/sessions", json={"user_id": "both"}).json()
    with Client(stack.grpc_target, api_key=ADMIN_KEY) as direct:
        got = direct.sessions.GetSession(session_pb2.GetSessionRequest(session_id=created["session_id"]))
    assert got.user_id == "both"
