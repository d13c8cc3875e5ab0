"""A per-tenant rate limit shared by two flowport processes, each behind its
own Envoy, counted in one real Redis; and what happens when Redis goes away
and comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from flowport.clients import ApiError, Client
from flowport.clients.cli.connect import EXIT_API_ERROR, explain
from flowport.server.settings import Settings
from flowport.v1 import session_pb2

from ..backends import RedisServer
from ..conftest import ADMIN_HEADERS, EnvoyProcess, ServeProcess, make_settings

pytestmark = pytest.mark.integration

LIMIT = 8
# One long fixed window: every request of the test falls in it (see _window).
WINDOW = 3600.0


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[list[str]]:
    """Two servers on one PostgreSQL database and one Redis, each behind its own Envoy; their URLs."""
    started: list[ServeProcess | EnvoyProcess] = []
    urls = []
    try:
        for name in ("a", "b"):
            settings = make_settings(
                tmp_path / name,
                database_url=postgres_url,
                redis_url=redis_url,
                rate_limit_tenant_max_requests=LIMIT,
                rate_limit_time_window=WINDOW,
            )
            urls.append(_behind_envoy(settings, started))
        yield urls
    finally:
        for process in reversed(started):
            process.stop()


def _behind_envoy(settings: Settings, started: list[ServeProcess | EnvoyProcess]) -> str:
    """Start a server and its Envoy (added to `started`, for the caller to stop) and wait until
    Envoy sees the server healthy; Envoy's URL."""
    server, envoy = ServeProcess(settings), EnvoyProcess(settings)
    server.start()
    started.append(server)
    envoy.start()
    started.append(envoy)
    deadline = time.monotonic() + 15
    while httpx.get(f"{settings.http_url}/healthz").status_code != 200:
        assert time.monotonic() < deadline, "Envoy never saw the server healthy"
        time.sleep(0.1)
    return settings.http_url


def _window() -> None:
    """Wait out a window boundary if one is about to pass (the counters are per fixed window)."""
    left = WINDOW - time.time() % WINDOW
    if left < 30:
        time.sleep(left + 0.5)


def _user_key(url: str, tenant: str) -> str:
    response = httpx.post(f"{url}/api/keys", json={"tenant": tenant, "roles": ["user"]}, headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return str(response.json()["key"])


def _statuses(urls: list[str], key: str, count: int) -> list[int]:
    """`count` calls alternating between the Envoys; their status codes."""
    return [
        httpx.get(f"{urls[n % 2]}/api/sessions", headers={"x-api-key": key}, timeout=10).status_code
        for n in range(count)
    ]


def _stats(url: str) -> dict[str, int]:
    security = httpx.get(f"{url}/api/stats", headers=ADMIN_HEADERS).json()["security"]
    return {k: int(v) for k, v in security.items()}


def test_the_tenant_limit_holds_in_total_across_processes(pair: list[str]) -> None:
    _window()
    acme = _user_key(pair[0], "acme")
    statuses = _statuses(pair, acme, 2 * LIMIT)
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == LIMIT, statuses
    # Refused in both processes' share, and counted where refused.
    assert 429 in statuses[0::2] and 429 in statuses[1::2]
    assert sum(_stats(url).get("rate_limits", 0) for url in pair) == LIMIT
    # Another tenant has its own count.
    globex = _user_key(pair[1], "globex")
    assert _statuses(pair, globex, 2) == [200, 200]
    limited = httpx.get(f"{pair[0]}/api/sessions", headers={"x-api-key": acme})
    assert limited.status_code == 429
    assert limited.headers["content-type"].startswith("application/json")
    assert limited.json()["code"] == 8  # RESOURCE_EXHAUSTED
    # When to come back: the end of the window (an hour's, so its unit names it).
    left = WINDOW - time.time() % WINDOW
    assert abs(int(limited.headers["retry-after"]) - left) <= 2, limited.headers
    assert f"{LIMIT};w=3600" in limited.headers["x-ratelimit-limit"], limited.headers
    assert str(int(limited.headers["retry-after"])) in limited.headers["x-ratelimit-reset"], limited.headers


def test_without_redis_requests_go_through_and_it_is_picked_up_again(
    pair: list[str], redis_server: RedisServer
) -> None:
    _window()
    acme = _user_key(pair[0], "acme")
    assert _statuses(pair, acme, LIMIT + 1)[-1] == 429
    redis_server.stop()
    try:
        # Fail-open: over the limit, yet answered, and counted as a backend failure.
        assert _statuses(pair, acme, 4) == [200] * 4
        assert sum(_stats(url).get("rate_limit_backend_failures", 0) for url in pair) >= 4
    finally:
        redis_server.start()
    # The restarted Redis is empty: counting starts again, without restarting flowport.
    deadline = time.monotonic() + 10
    statuses: list[int] = []
    while time.monotonic() < deadline:
        statuses = _statuses(pair, acme, LIMIT + 1)
        if statuses[-1] == 429:
            break
        time.sleep(0.2)
    assert statuses.count(200) == LIMIT and statuses[-1] == 429, statuses


def test_limits_that_fail_closed_without_redis_are_503_saying_so(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    """--rate-limit-fail-open false and Redis gone: requests are refused as the limits being
    unavailable (503, UNAVAILABLE), not as the tenant over its limit (429), and pass again once
    Redis is back. A gRPC caller through Envoy is told the same: UNAVAILABLE with the reason in
    its status details, so the SDK and the CLI say why rather than "cannot reach the server"."""
    settings = make_settings(
        tmp_path / "closed",
        redis_url=redis_url,
        rate_limit_tenant_max_requests=LIMIT,
        rate_limit_time_window=WINDOW,
        rate_limit_fail_open=False,
    )
    started: list[ServeProcess | EnvoyProcess] = []
    try:
        url = _behind_envoy(settings, started)
        _window()
        key = _user_key(url, "acme")
        assert _statuses([url, url], key, 1) == [200]
        redis_server.stop()
        try:
            refused = httpx.get(f"{url}/api/sessions", headers={"x-api-key": key}, timeout=10)
            assert refused.status_code == 503, refused.text
            body = refused.json()
            assert body["code"] == 14 and body["details"][0]["reason"] == "RATE_LIMIT_UNAVAILABLE", body
            assert "try again" in body["message"]
            assert not any(h.startswith("grpc-") for h in refused.headers), refused.headers
            target = url.removeprefix("http://")
            with Client(target, api_key=key, timeout=10, retries=1) as client, pytest.raises(ApiError) as raised:
                client.sessions.ListSessions(session_pb2.ListSessionsRequest())
            error = raised.value
            assert error.code() is grpc.StatusCode.UNAVAILABLE, error
            assert error.reason == "RATE_LIMIT_UNAVAILABLE" and error.domain == "envoy.flowport.dev", repr(error)
            assert error.details() == body["message"], error.details()
            assert error.status.code == 14 and error.status.message == body["message"], error.status
            told = explain(error, target, admin_needed=False)
            assert told.code == EXIT_API_ERROR and "is up but cannot serve this now" in str(told), told
        finally:
            redis_server.start()
        deadline = time.monotonic() + 10
        while _statuses([url, url], key, 1) != [200]:
            assert time.monotonic() < deadline, "requests never passed again once Redis was back"
            time.sleep(0.2)
    finally:
        for process in reversed(started):
            process.stop()
