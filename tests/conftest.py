"""Shared fixtures: free ports, settings in a temporary data dir, and one
real flowport stack (server + Envoy via `flowport up`) per test session."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from flowport.server.settings import Settings
from flowport.server.supervisor import child_environment

# The admin key every test stack is started with (FLOWPORT_ADMIN_API_KEY).
ADMIN_KEY = "fpk_test-admin.0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN_HEADERS = {"x-api-key": ADMIN_KEY}
ADMIN_METADATA = (("x-api-key", ADMIN_KEY),)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on free loopback ports with data in a temporary folder."""
    return make_settings(tmp_path / "data")


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Loopback ports, small pools, loopback allowed for HTTP nodes (receivers run on 127.0.0.1)."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "http_port": free_port(),
        "grpc_port": free_port(),
        "admin_port": free_port(),
        "shutdown_grace": 2.0,
        "sandbox_workers": 2,
        "http_allowlist": "127.0.0.1,localhost",
        "webhook_allowlist": "127.0.0.1,localhost",
        "admin_api_key": ADMIN_KEY,
    }
    values.update(overrides)
    return Settings.load(values, environ={})


@dataclass
class Stack:
    """A running `flowport up`: its process and where to reach it."""

    process: subprocess.Popen[str]
    settings: Settings
    output: list[str]

    @property
    def http(self) -> str:
        return self.settings.http_url

    @property
    def envoy_target(self) -> str:
        return f"127.0.0.1:{self.settings.http_port}"

    @property
    def grpc_target(self) -> str:
        return self.settings.grpc_target


def start_up(settings: Settings, timeout: float = 30.0) -> Stack:
    """Run `flowport up` with `settings` (as FLOWPORT_* variables) and wait for its "is up" line."""
    env = {k: v for k, v in child_environment(settings).items() if k != "FLOWPORT_ENVOY"}
    argv = [sys.executable, "-m", "flowport.clients.cli", "up"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Press Ctrl-C to stop." in line:
            return Stack(process, settings, output)
    process.kill()
    raise AssertionError("flowport up did not come up:\n" + "".join(output))


def stop_up(stack: Stack, timeout: float = 20.0) -> int:
    """SIGINT `flowport up` (as Ctrl-C would) and return its exit code."""
    stack.process.send_signal(signal.SIGINT)
    out, _ = stack.process.communicate(timeout=timeout)
    stack.output.append(out)
    return stack.process.returncode


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real server + Envoy for the integration tests that only make calls."""
    running = start_up(make_settings(tmp_path_factory.mktemp("stack")))
    try:
        yield running
    finally:
        stop_up(running)


class ServeProcess:
    """`flowport serve` as a child process that can be killed and restarted."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        from flowport.clients import Client
        from flowport.v1 import gateway_pb2

        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowport.clients.cli", "serve"], env=child_environment(self.settings)
        )
        deadline = time.monotonic() + timeout
        with Client(self.settings.grpc_target, api_key=ADMIN_KEY) as client:
            while time.monotonic() < deadline:
                try:
                    client.gateway.GetInfo(gateway_pb2.GetInfoRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    assert self.process.poll() is None, "flowport serve exited while starting"
                    time.sleep(0.1)
        raise AssertionError("flowport serve did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


class EnvoyProcess:
    """Envoy alone, on the config `flowport up` would render, in front of a ServeProcess."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        import json

        import httpx

        from flowport.server.envoy_binary import find_envoy
        from flowport.transcoder.envoy_config import render

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.settings.data_dir / "envoy.json"
        config.write_text(json.dumps(render(self.settings)))
        self.process = subprocess.Popen(
            [str(find_envoy(None)), "-c", str(config), "--disable-hot-restart", "--log-level", "error"]
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.settings.admin_port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, "Envoy exited while starting"
            time.sleep(0.05)
        raise AssertionError("Envoy did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
