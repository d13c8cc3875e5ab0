"""`flowport up` as a user runs it: starts both processes, stops them cleanly,
and refuses an occupied port by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flowport.server.envoy_binary import find_envoy
from flowport.server.settings import Settings
from flowport.transcoder.envoy_config import render

from ..conftest import start_up

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may contain spaces; fields after it are fixed.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_then_stops_both_processes_cleanly(settings: Settings, sig: signal.Signals) -> None:
    stack = start_up(settings)
    text = "".join(stack.output)
    assert settings.http_url in text and settings.grpc_target in text
    children = _children(stack.process.pid)
    assert len(children) == 2, f"expected server and Envoy, found {children}"
    assert httpx.get(f"{settings.http_url}/health", timeout=5).json()["status"] == "healthy"
    stack.process.send_signal(sig)
    out, _ = stack.process.communicate(timeout=30)
    assert stack.process.returncode == 0, out
    assert "flowport: stopped" in out
    assert all(_gone(pid) for pid in children), "a child outlived flowport up"
    # The embedded store is a file in the data dir; PostgreSQL keeps its own.
    assert (settings.data_dir / "flowport.db").exists() is (settings.database_url is None)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on PR_SET_PDEATHSIG")
def test_children_do_not_outlive_a_killed_supervisor(settings: Settings) -> None:
    stack = start_up(settings)
    children = _children(stack.process.pid)
    stack.process.send_signal(signal.SIGKILL)
    stack.process.wait(10)
    assert all(_gone(pid) for pid in children), "an orphan was left after kill -9 of flowport up"


@pytest.mark.parametrize(("flag", "which"), [("--http-port", "http_port"), ("--grpc-port", "grpc_port")])
def test_up_on_an_occupied_port_names_the_port(settings: Settings, flag: str, which: str) -> None:
    port = getattr(settings, which)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowport.clients.cli",
                "up",
                "--data-dir",
                str(settings.data_dir),
                "--http-port",
                str(settings.http_port),
                "--grpc-port",
                str(settings.grpc_port),
                "--admin-port",
                str(settings.admin_port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("FLOWPORT_")},
            check=False,
        )
    assert result.returncode == 2
    assert f"port {port} ({flag})" in result.stdout + result.stderr


def test_a_bad_setting_fails_at_start_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flowport.clients.cli", "serve", "--grpc-port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid setting grpc_port (flag --grpc-port)" in result.stderr


def test_rendered_envoy_config_passes_envoy_validation(settings: Settings, tmp_path: Path) -> None:
    import json

    config = tmp_path / "envoy.json"
    settings.data_dir.mkdir(parents=True)  # as `flowport up` does: the access log lives there
    config.write_text(json.dumps(render(settings)))
    result = subprocess.run(
        [str(find_envoy(None)), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
