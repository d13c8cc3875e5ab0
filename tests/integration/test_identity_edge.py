"""Identity at the edge, through a real Envoy and server: headers a client
sends cannot change who it is, and an unauthenticated caller replaying an
authenticated caller's request_id gets 401, never the first response (the
response cache of the gateway flowport replaces answered before checking
credentials)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from flowport.clients import ApiError, Client
from flowport.v1 import apikey_pb2, gateway_pb2, session_pb2

from ..conftest import ADMIN_HEADERS, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration

# Every header name a gateway might read identity from: Envoy removes ours,
# and the server reads identity only from a verified credential.
SPOOFED = {
    "x-flowport-tenant": "beta",
    "x-flowport-subject": "root",
    "x-flowport-roles": "admin",
    "x-envoy-original-path": "/api/keys",
}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_up(make_settings(tmp_path_factory.mktemp("identity")))
    yield stack
    stop_up(stack)


@pytest.fixture(scope="module")
def admin(edge: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.http, timeout=30, headers=ADMIN_HEADERS) as client:
        yield client


def _user_key(admin: httpx.Client, tenant: str) -> str:
    response = admin.post("/api/keys", json={"tenant": tenant, "roles": ["user"]})
    assert response.status_code == 200, response.text
    return str(response.json()["key"])


def _unauthenticated(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    return body


def test_identity_headers_sent_by_a_client_change_nothing(edge: Stack, admin: httpx.Client) -> None:
    alpha, beta = _user_key(admin, "alpha"), _user_key(admin, "beta")
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        spoofing_alpha = {"x-api-key": alpha, **SPOOFED}
        created = http.post("/api/sessions", json={"user_id": "u"}, headers=spoofing_alpha)
        assert created.status_code == 200, created.text
        session_id = created.json()["session_id"]
        # The session is alpha's, whatever the headers claimed.
        assert http.get(f"/api/sessions/{session_id}", headers={"x-api-key": alpha}).status_code == 200
        assert http.get(f"/api/sessions/{session_id}", headers={"x-api-key": beta}).status_code == 404
        # Claiming the admin role does not make an admin: alpha's own figures, none of the process's...
        stats = http.get("/api/stats", headers=spoofing_alpha)
        assert stats.status_code == 200 and stats.json()["tenant"] == "alpha" and "database" not in stats.json()
        assert http.get("/api/keys", headers=spoofing_alpha).status_code == 403
        # ...and claiming a tenant without a credential is no credential.
        _unauthenticated(http.get("/api/sessions", headers=SPOOFED))


def test_the_server_ignores_identity_metadata_on_direct_grpc(edge: Stack, admin: httpx.Client) -> None:
    # Without Envoy in the way, the server itself must not trust them either.
    alpha = _user_key(admin, "alpha")
    with Client(edge.settings.grpc_target, api_key=alpha) as client:
        metadata = tuple(SPOOFED.items())
        with pytest.raises(grpc.RpcError) as caught:
            client.keys.ListApiKeys(apikey_pb2.ListApiKeysRequest(), metadata=metadata)
        assert ApiError.from_rpc_error(caught.value).code() is grpc.StatusCode.PERMISSION_DENIED
        assert client.gateway.GetStats(gateway_pb2.GetStatsRequest(), metadata=metadata).tenant == "alpha"
        created = client.sessions.CreateSession(session_pb2.CreateSessionRequest(), metadata=metadata)
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        listed = http.get("/api/sessions", headers={"x-api-key": _user_key(admin, "beta")})
    assert created.session_id not in listed.text


def test_an_unauthenticated_replay_of_a_request_id_gets_401_not_the_first_response(
    edge: Stack, admin: httpx.Client
) -> None:
    request_id = f"replay-{uuid.uuid4()}"
    body, params = {"user_id": "victim", "metadata": {"card": "4111"}}, {"request_id": request_id}
    first = admin.post("/api/sessions", json=body, params=params)
    assert first.status_code == 200, first.text
    session_id = first.json()["session_id"]
    # A replay, for its owner.
    assert admin.post("/api/sessions", json=body, params=params).json()["session_id"] == session_id
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        for headers in ({}, {"x-api-key": "fpk_forged_0000000000"}, {"authorization": "Bearer not.a.jwt"}):
            refused = http.post("/api/sessions", json=body, params=params, headers=headers)
            _unauthenticated(refused)
            assert session_id not in refused.text and "victim" not in refused.text
        # Another tenant's caller with the same request_id gets its own new
        # session: idempotency records are per tenant.
        other = http.post("/api/sessions", json=body, params=params, headers={"x-api-key": _user_key(admin, "gamma")})
    assert other.status_code == 200, other.text
    assert other.json()["session_id"] != session_id


def test_a_failed_authentication_says_nothing_that_helps_an_attacker(edge: Stack, admin: httpx.Client) -> None:
    revoked = admin.post("/api/keys", json={"tenant": "alpha", "roles": ["user"]}).json()
    assert admin.post(f"/api/keys/{revoked['api_key']['key_id']}:revoke", json={}).status_code == 200
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        messages = {
            _unauthenticated(http.get("/api/sessions", headers=headers))["message"]
            for headers in (
                {},  # no credential
                {"x-api-key": "fpk_unknown_00000000000000"},  # unknown key
                {"x-api-key": revoked["key"]},  # revoked key
                {"authorization": "Bearer a.b.c"},  # malformed token
            )
        }
    # One message for every cause, naming none of them.
    assert len(messages) <= 2, messages  # "no credential" may be told apart from "bad credential"
    for message in messages:
        assert "revoked" not in message and "unknown" not in message and "expired" not in message


def test_secrets_over_rest_are_write_only_and_per_tenant(edge: Stack, admin: httpx.Client) -> None:
    value = f"s3cr3t-{uuid.uuid4()}"
    alpha, beta = _user_key(admin, "alpha"), _user_key(admin, "beta")
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        put = http.put("/api/secrets/PAYMENT_TOKEN", json={"value": value}, headers={"x-api-key": alpha})
        assert put.status_code == 200, put.text
        got = http.get("/api/secrets/PAYMENT_TOKEN", headers={"x-api-key": alpha})
        listed = http.get("/api/secrets", headers={"x-api-key": alpha})
        assert got.status_code == listed.status_code == 200
        assert value not in put.text + got.text + listed.text
        assert got.json()["name"] == "PAYMENT_TOKEN"
        assert http.get("/api/secrets/PAYMENT_TOKEN", headers={"x-api-key": beta}).status_code == 404
        bad = http.put("/api/secrets/not-a-name", json={"value": value}, headers={"x-api-key": alpha})
        assert bad.status_code == 400 and value not in bad.text
        assert http.delete("/api/secrets/PAYMENT_TOKEN", headers={"x-api-key": beta}).status_code == 404
        assert http.delete("/api/secrets/PAYMENT_TOKEN", headers={"x-api-key": alpha}).status_code == 200


def test_only_the_api_health_and_reflection_are_routed_to_the_server(edge: Stack) -> None:
    # Envoy's rate limit service shares the server's port; clients must not reach it (or
    # anything else unknown) through the edge.
    with grpc.insecure_channel(edge.envoy_target) as channel:
        for path in ("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", "/no.such.Service/Call"):
            call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED, path
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        assert health(b"", timeout=10) == b"\x08\x01"  # SERVING


def test_two_credentials_on_one_call_are_refused(edge: Stack, admin: httpx.Client) -> None:
    # Envoy's rate limit would count the first, the server would check the last.
    alpha = _user_key(admin, "alpha")
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        headers = [("x-api-key", "fpk_junk_000000000000"), ("x-api-key", alpha)]
        _unauthenticated(http.get("/api/sessions", headers=headers))
        _unauthenticated(http.get("/api/sessions", headers=[("x-api-key", alpha), ("authorization", "Bearer a.b.c")]))
        assert http.get("/api/sessions", headers={"x-api-key": alpha}).status_code == 200
    # A tenant name is checked whole: no trailing newline passes for "acme".
    refused = admin.post("/api/keys", json={"tenant": "acme\n", "roles": ["user"]})
    assert refused.status_code == 400
