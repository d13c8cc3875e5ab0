"""Rate limits and health at the edge, through a real Envoy: buckets per
client and per route, 429 JSON with x-ratelimit headers, RESOURCE_EXHAUSTED
for gRPC, no bucket-picking by forged headers, /healthz that follows the
server, and fast 503s that recover after a restart."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flowport.clients import ApiError, Client
from flowport.v1 import apikey_pb2, gateway_pb2

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, EnvoyProcess, ServeProcess, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration
# Envoy refills its buckets continuously (a token every window / limit), so a short window would
# hand tokens back in the middle of a check on a slow machine. The module's stack has a window
# no test outlasts: a drained bucket stays drained. Each test calls from an address of its own
# (127.0.0.0/8 is all loopback) with keys of its own, so no test spends another's tokens.
WINDOW = 3600.0
CLIENT_LIMIT = 8
ADDRESS_LIMIT = 4 * CLIENT_LIMIT
EXECUTION_LIMIT = 12
# What one client or one address may spend of the executions' shared bucket (--rate-limit-client-share).
EXECUTION_SHARE = EXECUTION_LIMIT // 4
_addresses = itertools.count(2)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = make_settings(
        tmp_path_factory.mktemp("limited"),
        rate_limit_max_requests=1000,
        rate_limit_client_max_requests=CLIENT_LIMIT,
        rate_limit_execution_max_requests=EXECUTION_LIMIT,
        rate_limit_time_window=WINDOW,
    )
    stack = start_up(settings)
    yield stack
    stop_up(stack)


def _client(stack: Stack) -> httpx.Client:
    """A client calling from a loopback address no other test uses."""
    transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
    return httpx.Client(base_url=stack.http, timeout=10, transport=transport)


def _user_key(stack: Stack) -> str:
    """A fresh key, made on the server directly: no bucket of Envoy's pays for it."""
    with Client(stack.settings.grpc_target, api_key=ADMIN_KEY) as client:
        made = client.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(roles=["user"])))
    return str(made.key)


def _drain(client: httpx.Client, path: str, headers: dict[str, str] | None = None, limit: int = 100) -> int:
    """Calls until the first 429, which is the return value's; how many were answered before it."""
    for answered in range(limit):
        if client.get(path, headers=headers).status_code == 429:
            return answered
    raise AssertionError(f"no 429 within {limit} requests")


def test_a_burst_meets_429_json_with_rate_limit_headers_and_recovers(tmp_path: Path) -> None:
    # A short window, to see the bucket refill: tokens only come back here, so nothing is timed.
    window, limit = 1.0, 4
    settings = make_settings(tmp_path, rate_limit_client_max_requests=limit, rate_limit_time_window=window)
    stack = start_up(settings)
    try:
        with httpx.Client(base_url=stack.http, timeout=10) as client:
            for _ in range(100):
                limited_response = client.get("/health")
                if limited_response.status_code == 429:
                    break
            assert limited_response.status_code == 429
            assert limited_response.headers["content-type"].startswith("application/json")
            body = limited_response.json()
            assert body["code"] == 8 and body["details"][0]["reason"] == "RATE_LIMITED"
            assert limited_response.headers["x-ratelimit-limit"] == str(limit)
            assert limited_response.headers["x-ratelimit-remaining"] == "0"
            assert "x-ratelimit-reset" in limited_response.headers and "retry-after" in limited_response.headers
            time.sleep(window * 1.5)  # lets the bucket refill; not a timing assertion
            assert client.get("/health").status_code == 200
    finally:
        stop_up(stack)


def test_one_noisy_client_does_not_starve_another(limited: Stack) -> None:
    noisy, quiet = _user_key(limited), _user_key(limited)
    with _client(limited) as client:
        assert _drain(client, "/health", {"x-api-key": noisy}) == CLIENT_LIMIT
        # Same address, another key: its own bucket, still full.
        assert client.get("/health", headers={"x-api-key": quiet}).status_code == 200


def test_made_up_keys_still_meet_the_address_bucket(limited: Stack) -> None:
    with _client(limited) as client:
        statuses = [client.get("/health", headers={"x-api-key": f"k{i}"}).status_code for i in range(ADDRESS_LIMIT + 1)]
    # A fresh key per request escapes every per-key bucket, not the address's.
    assert statuses == [200] * ADDRESS_LIMIT + [429], statuses


def test_forged_forwarding_headers_do_not_pick_another_bucket(limited: Stack) -> None:
    with _client(limited) as client:
        assert _drain(client, "/health") == CLIENT_LIMIT
        forged = client.get("/health", headers={"x-forwarded-for": "203.0.113.7", "x-real-ip": "203.0.113.7"})
        assert forged.status_code == 429, "the bucket is the peer address Envoy saw, not one the client claims"


def test_executions_have_a_stricter_bucket_than_reads(limited: Stack) -> None:
    key = {"x-api-key": _user_key(limited)}
    with _client(limited) as client:
        statuses = [
            client.post("/api/executions", json={"workflow_id": "missing"}, headers=key).status_code
            for i in range(EXECUTION_SHARE + 1)
        ]
    # Fewer calls than the client bucket of reads holds: the route's own buckets run out.
    assert statuses == [404] * EXECUTION_SHARE + [429], statuses


def test_one_caller_cannot_empty_a_shared_bucket_even_with_made_up_keys(limited: Stack) -> None:
    with _client(limited) as client:
        # No valid key at all: a fresh key per request escapes the per-key buckets, and the address's
        # holds a quarter of the executions' shared bucket, however many requests follow.
        statuses = [
            client.post("/api/executions", json={"workflow_id": "x"}, headers={"x-api-key": f"made-up-{i}"}).status_code
            for i in range(EXECUTION_LIMIT + 4)
        ]
    assert statuses == [401] * EXECUTION_SHARE + [429] * (EXECUTION_LIMIT + 4 - EXECUTION_SHARE), statuses
    # The calls refused by the caller's own bucket spent nothing of the shared one: a caller from
    # elsewhere still gets through.
    key = {"x-api-key": _user_key(limited)}
    with _client(limited) as other:
        answer = other.post("/api/executions", json={"workflow_id": "missing"}, headers=key)
    assert answer.status_code == 404, answer.text


def test_a_limited_grpc_call_is_resource_exhausted(limited: Stack) -> None:
    with Client(limited.envoy_target, api_key=_user_key(limited)) as client:
        for _ in range(CLIENT_LIMIT):
            client.gateway.GetInfo(gateway_pb2.GetInfoRequest(), timeout=10)
        with pytest.raises(ApiError) as limited_call:
            client.gateway.GetInfo(gateway_pb2.GetInfoRequest(), timeout=10)
    assert limited_call.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, limited_call.value


@pytest.fixture
def separate(tmp_path: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, EnvoyProcess]]:
    settings = make_settings(tmp_path / "data")  # type: ignore[operator]
    server, envoy = ServeProcess(settings), EnvoyProcess(settings)
    server.start()
    envoy.start()
    yield server, envoy
    envoy.stop()
    server.stop()


def _poll(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_healthz_follows_the_server_and_rest_fails_fast_then_recovers(
    separate: tuple[ServeProcess, EnvoyProcess],
) -> None:
    server, envoy = separate
    base = envoy.settings.http_url
    assert _poll(lambda: httpx.get(f"{base}/healthz").status_code == 200, 10)
    server.stop()
    assert _poll(lambda: httpx.get(f"{base}/healthz").status_code == 503, 10), "/healthz did not turn 503"
    down = httpx.get(f"{base}/health", timeout=10)
    assert down.status_code == 503
    assert down.json()["code"] == 14, "Envoy's own 503 is a JSON google.rpc.Status"
    server.start()
    assert _poll(lambda: httpx.get(f"{base}/healthz").status_code == 200, 10), "/healthz did not recover"
    assert _poll(lambda: httpx.get(f"{base}/health").status_code == 200, 10), "REST did not recover"


def test_a_unary_call_over_the_route_timeout_is_504_json(tmp_path: pytest.TempPathFactory) -> None:
    # No RPC of the server is slow on purpose (a waiting CreateExecution has
    # a route timeout beyond its longest wait), so the upstream here is a
    # stand-in: healthy to Envoy's checks, and never answering GetSession.
    settings = make_settings(tmp_path / "data", unary_timeout=1.0)  # type: ignore[operator]
    release = threading.Event()

    def hang(request: bytes, context: grpc.ServicerContext) -> bytes:
        release.wait(10)
        return b""

    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, upstream)
    upstream.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "flowport.v1.SessionService", {"GetSession": grpc.unary_unary_rpc_method_handler(hang)}
            )
        ]
    )
    upstream.add_insecure_port(settings.grpc_target)
    upstream.start()
    envoy = EnvoyProcess(settings)
    envoy.start()
    try:
        base = settings.http_url
        assert _poll(lambda: httpx.get(f"{base}/healthz").status_code == 200, 10)
        response = httpx.get(f"{base}/api/sessions/ses_slow", timeout=30, headers=ADMIN_HEADERS)
        assert response.status_code == 504
        assert response.json()["code"] == 4, "DEADLINE_EXCEEDED, as JSON"
    finally:
        release.set()
        envoy.stop()
        upstream.stop(0)


@pytest.mark.timeout(60)
def test_headers_sent_a_byte_at_a_time_lose_their_connection(stack: Stack) -> None:
    """A client that never finishes its request headers (slowloris) is answered 408 and cut once
    REQUEST_HEADERS_SECONDS have passed, instead of holding its connection for the idle timeout."""
    import socket

    from flowport.server.limits import REQUEST_HEADERS_SECONDS

    with socket.create_connection(("127.0.0.1", stack.settings.http_port), timeout=REQUEST_HEADERS_SECONDS * 3) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: flowport\r\nX-Slow: a")
        answer = b""
        while chunk := sock.recv(4096):  # until Envoy closes it (the socket's timeout bounds the wait)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
