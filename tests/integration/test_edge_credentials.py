"""Credentials at the edge, through a real Envoy and server: a call carries
one credential, and one with two of any kinds (x-api-key, authorization,
?access_token=, two flowport_token cookies) is refused with a 401 that says
so, over REST, the WebSocket and gRPC alike, never run as one of them (a
cookie, which a browser sends unasked, yields to a credential the request
names); and a
credential that is not UTF-8 is a clean 401 with one quiet log line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from flowport.clients import ApiError, Client
from flowport.v1 import session_pb2

from ..conftest import ADMIN_HEADERS, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Every refusal here comes from 127.0.0.1: no slow-down after the fifth.
    stack = start_up(make_settings(tmp_path_factory.mktemp("credentials"), max_login_attempts=1000))
    yield stack
    stop_up(stack)


@pytest.fixture(scope="module")
def keys(edge: Stack) -> tuple[str, str]:
    """Two valid user keys, of tenants alpha and beta."""
    with httpx.Client(base_url=edge.http, headers=ADMIN_HEADERS, timeout=30) as admin:
        made = [admin.post("/api/keys", json={"tenant": t, "roles": ["user"]}) for t in ("alpha", "beta")]
    assert all(r.status_code == 200 for r in made), [r.text for r in made]
    return str(made[0].json()["key"]), str(made[1].json()["key"])


def _two_credentials(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert body["details"][0]["reason"] == "MULTIPLE_CREDENTIALS", body
    assert "one credential" in body["message"], body
    return body


def _events(http: httpx.Client, params: dict[str, str] | None = None, **headers: str) -> tuple[int, str]:
    """The status of GET /events and its first line (a heartbeat when it opened)."""
    with http.stream("GET", "/events", params=params, headers=headers) as response:
        return response.status_code, next(response.iter_lines())


def test_a_query_token_never_replaces_a_header(edge: Stack, keys: tuple[str, str]) -> None:
    alpha, beta = keys
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        # It used to run as the token's tenant (beta), the header silently dropped.
        for header, token in ((alpha, beta), ("fpk_junk_000000000000", alpha), (alpha, "fpk_junk_000000000000")):
            _two_credentials(http.get("/api/sessions", params={"access_token": token}, headers={"x-api-key": header}))
        _two_credentials(
            http.get("/api/sessions", params={"access_token": alpha}, headers={"authorization": "Bearer a.b.c"})
        )
        _two_credentials(http.get("/api/sessions", params={"access_token": "a.b.c"}, headers={"x-api-key": alpha}))
        # Two tokens: the last one used to win.
        _two_credentials(http.get("/api/sessions", params=[("access_token", beta), ("access_token", alpha)]))
        # One, of any kind, still works.
        assert http.get("/api/sessions", params={"access_token": alpha}).status_code == 200
        assert http.get("/api/sessions", headers={"x-api-key": alpha}).status_code == 200
        # An empty ?access_token= is no credential (and no unknown query parameter).
        assert http.get("/api/sessions", params={"access_token": ""}, headers={"x-api-key": alpha}).status_code == 200


def test_a_cookie_yields_to_the_credential_a_request_names_and_two_cookies_are_refused(
    edge: Stack, keys: tuple[str, str]
) -> None:
    """A browser sends the flowport_token cookie with every request of the page's origin (the
    console's ?access_token= streams too): a credential the request names itself is the one used,
    and the cookie is dropped. Two cookies are ambiguous, and refused."""
    alpha, beta = keys
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        session = http.post("/api/sessions", json={}, headers={"x-api-key": alpha}).json()["session_id"]
        mine = {"session_id": session}  # alpha's session: opening its events as beta is a 404
        assert _events(http, mine, cookie=f"flowport_token={beta}")[0] == 404, "beta's cookie alone is beta"
        for params, headers in (({}, {"x-api-key": alpha}), ({"access_token": alpha}, {})):
            status, line = _events(http, {**mine, **params}, cookie=f"flowport_token={beta}", **headers)
            assert status == 200, (params, headers, line)
        # Two cookies: the last one used to win.
        status, line = _events(http, cookie=f"flowport_token={alpha}; flowport_token={beta}")
        assert status == 401 and json.loads(line)["details"][0]["reason"] == "MULTIPLE_CREDENTIALS", line
        # Cookies in two Cookie headers (as HTTP/2 splits them) count both.
        split = [("cookie", f"flowport_token={alpha}"), ("cookie", f"flowport_token={beta}")]
        with http.stream("GET", "/events", headers=split) as response:
            assert response.status_code == 401
        # One cookie, or an empty one beside a header, opens the stream.
        assert _events(http, cookie=f"flowport_token={alpha}")[0] == 200
        assert _events(http, cookie="flowport_token=; theme=dark", **{"x-api-key": alpha})[0] == 200


def test_the_websocket_refuses_two_credentials_before_the_upgrade(edge: Stack, keys: tuple[str, str]) -> None:
    alpha, beta = keys
    url = f"ws://127.0.0.1:{edge.settings.http_port}/ws"
    for query, headers in (
        (f"?access_token={beta}", {"x-api-key": alpha}),
        ("", {"cookie": f"flowport_token={beta}; flowport_token={alpha}"}),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(url + query, additional_headers=headers, open_timeout=10).close()
        assert refused.value.response.status_code == 401, (query, headers)
    with connect(url, additional_headers={"x-api-key": alpha}, open_timeout=10):
        pass


def test_two_credentials_over_grpc_are_refused_with_the_same_words(edge: Stack, keys: tuple[str, str]) -> None:
    alpha, beta = keys
    for target in (edge.grpc_target, edge.envoy_target):
        for metadata in (
            (("x-api-key", alpha), ("x-api-key", beta)),
            (("x-api-key", alpha), ("authorization", "Bearer a.b.c")),
        ):
            with Client(target) as client, pytest.raises(ApiError) as caught:
                client.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=metadata)
            error = caught.value
            assert (error.code(), error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MULTIPLE_CREDENTIALS"), error
            assert "one credential" in error.message


def test_a_credential_that_is_not_utf8_is_a_clean_401_and_one_quiet_log_line(edge: Stack) -> None:
    edge.printed_since_read()
    bad = b"fpk_\xff\xfe\xc3(not-utf8"
    with httpx.Client(base_url=edge.http, timeout=30) as http:
        response = http.get("/api/sessions", headers=[(b"x-api-key", bad), (b"user-agent", b"credential-probe")])
        assert response.status_code == 401, response.text
        assert response.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        # The same answer for a bearer token that is not UTF-8.
        assert http.get("/api/sessions", headers=[(b"authorization", b"Bearer \xff.\xfe.x")]).status_code == 401
        # Nothing was left pending: the next call is answered as usual.
        assert http.get("/api/sessions", headers=ADMIN_HEADERS).status_code == 200
    printed = edge.printed_since_read()
    # It used to log nine ERROR records, each with a traceback quoting the key's bytes.
    assert "Traceback" not in printed and '"level":"ERROR"' not in printed, printed[-3000:]
    assert "\\xff" not in printed and "not-utf8" not in printed, printed[-3000:]
    lines = [line for line in printed.splitlines() if "authentication failed" in line]
    assert len(lines) == 2 and all('"level":"WARNING"' in line for line in lines), lines
