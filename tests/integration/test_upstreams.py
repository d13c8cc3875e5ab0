"""`flowport up --no-local-server`: Envoy alone in front of a `flowport serve` it was pointed
at with --upstream and --upstream-dns, answering as a whole stack does."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowport.server.envoy_binary import find_envoy
from flowport.transcoder.envoy_config import render
from flowport.transcoder.envoy_routes import CLUSTER

from ..conftest import ADMIN_HEADERS, ServeProcess, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration


@pytest.mark.timeout(90)
def test_a_config_with_addresses_and_names_passes_envoy_validation(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data",
        no_local_server=True,
        upstream="10.0.0.2:50051,[fd00::3]:50051",
        upstream_dns="flowport-servers.default.svc.cluster.local:50051",
    )
    settings.data_dir.mkdir(parents=True)  # the access log lives there
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(render(settings)))
    result = subprocess.run(
        [str(find_envoy(None)), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _hosts(admin_port: int) -> list[dict[str, Any]]:
    """The servers' cluster as Envoy's admin shows it, once every host has passed a health check (or 10s on)."""
    deadline = time.monotonic() + 10
    while True:
        clusters = httpx.get(f"http://127.0.0.1:{admin_port}/clusters?format=json", timeout=5).json()
        grpc = next(c for c in clusters["cluster_statuses"] if c["name"] == CLUSTER)
        hosts: list[dict[str, Any]] = grpc.get("host_statuses", [])
        healthy = all(h["health_status"] == {"eds_health_status": "HEALTHY"} for h in hosts)
        if (len(hosts) == 2 and healthy) or time.monotonic() > deadline:
            return hosts
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_envoy_alone_serves_calls_through_an_upstream_server(tmp_path: Path) -> None:
    server = ServeProcess(make_settings(tmp_path / "server"))
    server.start()
    try:
        port = server.settings.grpc_port
        edge = make_settings(tmp_path / "edge", websocket_port=server.settings.websocket_port)
        # The same server by address and by name: one STRICT_DNS cluster resolves both.
        stack = start_up(
            edge,
            args=["--no-local-server", "--upstream", f"127.0.0.1:{port}", "--upstream-dns", f"localhost:{port}"],
        )
        try:
            text = "".join(stack.output)
            assert f"gRPC (upstreams)     127.0.0.1:{port}, localhost:{port} (DNS)" in text
            assert "gRPC (server)" not in text and "admin API key" not in text
            # No server of its own: nothing listens on the edge's --grpc-port.
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", edge.grpc_port)) != 0
            # Two endpoints, the name resolved to the server's address, both passing their health checks.
            hosts = _hosts(edge.admin_port)
            assert sorted(h["hostname"] for h in hosts) == ["127.0.0.1", "localhost"], hosts
            for host in hosts:
                assert host["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": port}, host
                assert host["health_status"] == {"eds_health_status": "HEALTHY"}, host

            assert httpx.get(f"{stack.http}/healthz", timeout=10).status_code == 200
            health = httpx.get(f"{stack.http}/health", timeout=10)
            assert health.status_code == 200, health.text
            assert httpx.get(f"{stack.http}/api/sessions", timeout=10).status_code == 401
            created = httpx.post(
                f"{stack.http}/api/sessions", json={"user_id": "ada"}, headers=ADMIN_HEADERS, timeout=10
            )
            assert created.status_code == 200, created.text
            session = created.json()["session_id"]
            # The server behind Envoy holds it: the same session read back through Envoy.
            read = httpx.get(f"{stack.http}/api/sessions/{session}", headers=ADMIN_HEADERS, timeout=10)
            assert read.status_code == 200 and read.json()["session_id"] == session
        finally:
            assert stop_up(stack) == 0
        assert "flowport: stopped" in stack.output[-1]
        # Stopping Envoy leaves the server it fronted running.
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()
