"""`flowport up --workers 2`: two server processes behind the one Envoy, on
PostgreSQL and Redis; a worker killed with SIGKILL is started again while
the other serves; refused without the shared backends."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from flowport.clients import Client
from flowport.server.settings import Settings
from flowport.v1 import gateway_pb2

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, make_settings, start_up, stop_up
from .test_up import _children, _gone

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")]


def _calls(settings: Settings, port: int) -> int:
    """Calls the server on `port` has answered (its own stats call included)."""
    target = settings.model_copy(update={"grpc_port": port}).grpc_target
    with Client(target, api_key=ADMIN_KEY) as client:
        return int(client.gateway.GetStats(gateway_pb2.GetStatsRequest()).requests.total)


def test_two_workers_share_the_load_and_a_killed_one_comes_back(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "data", workers=2, database_url=postgres_url, redis_url=redis_url)
    stack = start_up(settings)
    try:
        children = _children(stack.process.pid)
        assert len(children) == 3, f"expected two servers and Envoy, found {children}"
        with httpx.Client(base_url=settings.http_url, headers=ADMIN_HEADERS, timeout=10) as http:
            for _ in range(40):
                assert http.get("/api/sessions").status_code == 200
            first, second = settings.grpc_ports
            assert _calls(settings, first) > 1 and _calls(settings, second) > 1, "both workers serve"
            # Kill the second worker: the supervisor starts it again; the first serves meanwhile,
            # REST calls and /ws upgrades alike (one Envoy sent to the dead worker before its
            # health check noticed is tried on the other).
            victim = next(pid for pid in children if _environ_port(pid) == str(second))
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            statuses = []
            upgrades = []
            while time.monotonic() < deadline:
                statuses.append(http.get("/api/sessions").status_code)
                upgrades.append(_upgrade(settings))
                replacement = [p for p in _children(stack.process.pid) if p not in children]
                if replacement and _serving(settings, second):
                    break
                time.sleep(0.2)
            assert replacement, "the killed worker was not started again"
            assert set(statuses) == {200}, statuses
            assert set(upgrades) == {101}, upgrades
        everyone = set(children) | set(_children(stack.process.pid))
    finally:
        code = stop_up(stack)
    assert code == 0
    assert all(_gone(pid) for pid in everyone), "a child outlived flowport up"


def _upgrade(settings: Settings) -> int:
    """The status of a /ws upgrade through Envoy (101 when it opened; closed at once)."""
    try:
        with connect(f"ws://127.0.0.1:{settings.http_port}/ws", additional_headers=ADMIN_HEADERS, open_timeout=10):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def _environ_port(pid: int) -> str:
    """The FLOWPORT_GRPC_PORT a child was started with."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"FLOWPORT_GRPC_PORT=")]
    return found[0] if found else ""


def _serving(settings: Settings, port: int) -> bool:
    try:
        return _calls(settings, port) >= 0
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_more_than_one_worker_needs_postgres_and_redis(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers above 1 need database_url"):
        make_settings(tmp_path, workers=2)
