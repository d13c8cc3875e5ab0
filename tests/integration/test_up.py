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

from ..conftest import ADMIN_HEADERS, make_settings, start_up, stop_up

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
    assert stop_up(stack, 30, sig) == 0, stack.printed_since_read()
    out = stack.printed_since_read()
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


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _sleeping(pid: int) -> bool | None:
    """Whether the process waits in a sleep call; None when the kernel does not say (no ptrace access)."""
    try:
        where = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return None
    return None if where in ("", "0") else "sleep" in where


SLEEPER = {
    "name": "sleeper",
    "nodes": [{"type": "PythonCodeNode", "name": "nap", "config": {"code": "import time\ntime.sleep(120)"}}],
    "connections": [],
}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.timeout(180)
def test_a_killed_server_comes_back_behind_the_same_envoy_and_its_sandbox_workers_die(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", sandbox_workers=1)
    stack = start_up(settings)
    try:
        children = _children(stack.process.pid)
        server = next(pid for pid in children if b"flowport.clients.cli" in _cmdline(pid))
        envoy = next(pid for pid in children if pid != server)
        worker = next(pid for pid in _children(server) if b"flowport.server.sandbox.worker" in _cmdline(pid))
        with httpx.Client(base_url=settings.http_url, headers=ADMIN_HEADERS, timeout=10) as http:
            assert http.post("/api/workflows", json=SLEEPER).status_code == 200
            assert http.post("/api/executions", json={"workflow_id": "sleeper"}).status_code == 200
            # The lone worker runs the user's time.sleep (idle, it would end at its pipe's EOF anyway).
            deadline = time.monotonic() + 30
            while _sleeping(worker) is False and time.monotonic() < deadline:
                time.sleep(0.05)
            if _sleeping(worker) is None:  # the kernel hides where it waits: give the job time to arrive
                time.sleep(2)
            assert _sleeping(worker) is not False, "the sandbox worker never ran the job"
            os.kill(server, signal.SIGKILL)
            assert _gone(worker, timeout=5), "the sandbox worker outlived its server"
            answers: list[httpx.Response] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                answers.append(http.get("/health"))
                if answers[-1].status_code == 200:
                    break
                time.sleep(0.05)
        assert answers[-1].status_code == 200, "the gateway did not come back"
        unavailable = [a for a in answers if a.status_code == 503]
        assert unavailable, [a.status_code for a in answers]
        assert {a.status_code for a in answers} <= {200, 503}
        for answer in unavailable:
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json()["code"] == 14  # UNAVAILABLE
        now = _children(stack.process.pid)
        assert envoy in now and server not in now and len(now) == 2, "Envoy kept running, the server is new"
    finally:
        code = stop_up(stack)
    assert code == 0
    assert "flowport: the server was killed by SIGKILL; starting it again in 1s" in "".join(stack.output)


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
    # Nothing it renders is on its way out of Envoy (each start would warn about it).
    assert "Deprecated field" not in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_a_second_sigterm_ends_a_long_drain_at_once(tmp_path: Path) -> None:
    from ..conftest import ServeProcess

    served = ServeProcess(make_settings(tmp_path / "data", drain_seconds=120))
    served.start()
    assert served.process is not None
    try:
        served.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert served.process.poll() is None, "the first SIGTERM drains (120 s here)"
        served.process.send_signal(signal.SIGTERM)
        # Well inside the drain the first signal began: the second one cut it.
        assert served.process.wait(60) == 0
    finally:
        if served.process.poll() is None:
            served.kill()


@pytest.mark.timeout(180)
def test_upstream_changes_made_at_once_are_each_applied(tmp_path: Path) -> None:
    from ..backends import free_ports

    stack = start_up(make_settings(tmp_path / "data", websocket_port=0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPORT_")}

    def upstreams(*argv: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "flowport.clients.cli", "upstreams", argv[0]]
        command += ["--data-dir", str(stack.settings.data_dir), *argv[1:]]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    try:
        first = free_ports(4)
        added = [f"127.0.0.1:{port}" for port in range(first, first + 4)]
        # Four changes at once: each reads what the one before it wrote, none is lost.
        changes = [upstreams("add", address) for address in added]
        for change in changes:
            out, _ = change.communicate(timeout=60)
            assert change.returncode == 0, out
        listed, _ = upstreams("list").communicate(timeout=60)
        assert sorted(line.split()[0] for line in listed.splitlines() if "upstream" in line) == sorted(added), listed
    finally:
        stop_up(stack)
