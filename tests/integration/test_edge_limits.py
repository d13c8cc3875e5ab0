"""Rate limits and health at the edge, through a real Envoy: buckets per
client and per route, 429 JSON with x-ratelimit headers, RESOURCE_EXHAUSTED
for gRPC, no bucket-picking by forged headers, /healthz that follows the
server, and fast 503s that recover after a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flowport.clients import ApiError, Client
from flowport.v1 import gateway_pb2

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, EnvoyProcess, ServeProcess, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration
WINDOW = 1.0
CLIENT_LIMIT = 8
EXECUTION_LIMIT = 3


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


def _drain(client: httpx.Client, path: str, headers: dict[str, str] | None = None, limit: int = 100) -> httpx.Response:
    for _ in range(limit):
        response = client.get(path, headers=headers)
        if response.status_code == 429:
            return response
    raise AssertionError(f"no 429 within {limit} requests")


def _wait_for_refill() -> None:
    time.sleep(WINDOW * 1.5)  # lets the buckets refill; not a timing assertion


def test_a_burst_meets_429_json_with_rate_limit_headers_and_recovers(limited: Stack) -> None:
    _wait_for_refill()
    with httpx.Client(base_url=limited.http, timeout=10) as client:
        limited_response = _drain(client, "/health")
        assert limited_response.headers["content-type"].startswith("application/json")
        body = limited_response.json()
        assert body["code"] == 8 and body["details"][0]["reason"] == "RATE_LIMITED"
        assert limited_response.headers["x-ratelimit-limit"] == str(CLIENT_LIMIT)
        assert limited_response.headers["x-ratelimit-remaining"] == "0"
        assert "x-ratelimit-reset" in limited_response.headers and "retry-after" in limited_response.headers
        _wait_for_refill()
        assert client.get("/health").status_code == 200


def test_one_noisy_client_does_not_starve_another(limited: Stack) -> None:
    _wait_for_refill()
    with httpx.Client(base_url=limited.http, timeout=10) as client:
        keys = [
            client.post("/api/keys", json={"description": name}, headers=ADMIN_HEADERS).json()["key"]
            for name in ("noisy", "quiet")
        ]
        _wait_for_refill()
        _drain(client, "/health", {"x-api-key": keys[0]}, limit=CLIENT_LIMIT + 2)
        # Same address, another key: its own bucket, still full.
        assert client.get("/health", headers={"x-api-key": keys[1]}).status_code == 200


def test_made_up_keys_still_meet_the_address_bucket(limited: Stack) -> None:
    _wait_for_refill()
    with httpx.Client(base_url=limited.http, timeout=10) as client:
        statuses = [client.get("/health", headers={"x-api-key": f"k{i}"}).status_code for i in range(6 * CLIENT_LIMIT)]
    assert 429 in statuses, "a fresh key per request must not escape every per-client limit"


def test_forged_forwarding_headers_do_not_pick_another_bucket(limited: Stack) -> None:
    _wait_for_refill()
    with httpx.Client(base_url=limited.http, timeout=10) as client:
        _drain(client, "/health")
        forged = client.get("/health", headers={"x-forwarded-for": "203.0.113.7", "x-real-ip": "203.0.113.7"})
        assert forged.status_code == 429, "the bucket is the peer address Envoy saw, not one the client claims"


def test_executions_have_a_stricter_bucket_than_reads(limited: Stack) -> None:
    _wait_for_refill()
    with httpx.Client(base_url=limited.http, timeout=10) as client:
        statuses = [
            client.post("/api/executions", json={"workflow_id": "missing"}, headers=ADMIN_HEADERS).status_code
            for i in range(EXECUTION_LIMIT + 3)
        ]
    # Fewer calls than the client bucket holds: the route's own bucket runs out.
    assert statuses[:EXECUTION_LIMIT] == [404] * EXECUTION_LIMIT
    assert 429 in statuses[EXECUTION_LIMIT:]


def test_a_limited_grpc_call_is_resource_exhausted(limited: Stack) -> None:
    _wait_for_refill()
    with Client(limited.envoy_target, api_key=ADMIN_KEY) as client:
        for _ in range(100):
            try:
                client.gateway.GetInfo(gateway_pb2.GetInfoRequest(), timeout=5)
            except grpc.RpcError as exc:
                error = ApiError.from_rpc_error(exc)
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
                return
    raise AssertionError("no call was rate limited")


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
