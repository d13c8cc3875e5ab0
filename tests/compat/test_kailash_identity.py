"""What Kailash's gateway tests read of a gateway built with `title=` and `version=`: `GET /`
`name` and `version`, the stats' `gateway`, and a session answer's `api_version` (k002, k007, k025,
k079, k110). `--title` and `--display-version` set them; `release` always says which flowport
answered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from flowport.clients import AsyncClient
from flowport.server.app import start, stop
from flowport.server.version import VERSION
from flowport.v1 import gateway_pb2, session_pb2

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, Stack, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def titled(tmp_path: Path) -> AsyncIterator[AsyncClient]:
    """A server in process built as Kailash's tests build theirs: title "Test Gateway", version "1.0.0"."""
    server = await start(make_settings(tmp_path / "data", title="Test Gateway", display_version="1.0.0"))
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as client:
            yield client
    finally:
        await stop(server, 1.0)


async def test_k002_k007_k025_k079_k110_the_title_and_version_it_was_given(titled: AsyncClient) -> None:
    info = await titled.gateway.GetInfo(gateway_pb2.GetInfoRequest())
    assert (info.name, info.version, info.release) == ("Test Gateway", "1.0.0", VERSION)
    assert info.type == "enterprise_workflow_server" and info.enterprise.durability
    health = await titled.gateway.GetHealth(gateway_pb2.GetHealthRequest())
    assert (health.version, health.release) == ("1.0.0", VERSION)
    stats = await titled.gateway.GetStats(gateway_pb2.GetStatsRequest())
    gateway = stats.gateway
    assert (gateway.name, gateway.title, gateway.version, gateway.release) == (
        "Test Gateway",
        "Test Gateway",
        "1.0.0",
        VERSION,
    )
    made = await titled.sessions.CreateSession(
        session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="test-user"))
    )
    got = await titled.sessions.GetSession(session_pb2.GetSessionRequest(session_id=made.session_id))
    assert made.api_version == got.api_version == "1.0.0"


def test_k025_by_default_flowport_and_its_release_through_envoy(stack: Stack) -> None:
    with httpx.Client(base_url=stack.http, timeout=30, headers=ADMIN_HEADERS) as http:
        root = http.get("/").json()
        assert (root["name"], root["version"], root["release"]) == ("flowport", VERSION, VERSION)
        assert http.get("/health").json()["release"] == VERSION
        made = http.post("/api/sessions", json={"user_id": "test-user", "metadata": {"source": "test"}})
        assert made.status_code == 200, made.text
        assert made.json()["api_version"] == root["version"]
        got = http.get(f"/api/sessions/{made.json()['session_id']}").json()
        assert got["api_version"] == root["version"]
        listed = http.get("/api/sessions", params={"page_size": 1}).json()["sessions"][0]
        assert listed["api_version"] == root["version"]
        gateway = http.get("/api/stats").json()["gateway"]
        assert (gateway["name"], gateway["title"], gateway["release"]) == ("flowport", "flowport", VERSION)
