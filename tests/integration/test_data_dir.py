"""The data dir after a real start: private modes, one process at a time, and
a one-line error (no traceback) when it is read-only or not a directory."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flowport.clients import Client
from flowport.server.settings import Settings
from flowport.server.supervisor import child_environment
from flowport.v1 import gateway_pb2

from ..conftest import ADMIN_KEY, ServeProcess, make_settings, start_up, stop_up

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="POSIX modes and flock")]


def _flowport(command: str, settings: Settings, *, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`flowport <command>` with `settings`, to its exit (it is expected to refuse to start)."""
    env = {k: v for k, v in child_environment(settings).items() if k != "FLOWPORT_ENVOY"}
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "flowport.clients.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused start printed (stdout for `up`, stderr for `serve`)."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.timeout(180)
def test_a_fresh_data_dir_is_private_after_a_real_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    stack = start_up(settings)
    try:
        # A call, so Envoy's access log and the database's WAL have been written.
        assert httpx.get(f"{settings.http_url}/health", timeout=10).status_code == 200
        files = [p for p in settings.data_dir.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"flowport.db", "flowport.db-wal", "flowport.db-shm", "access.log", "envoy.json", "lock"} <= names
        loose = {str(p.relative_to(settings.data_dir)): oct(_mode(p)) for p in files if _mode(p) & 0o077}
        dirs = [settings.data_dir, *(p for p in settings.data_dir.rglob("*") if p.is_dir())]
        loose.update({str(p): oct(_mode(p)) for p in dirs if _mode(p) & 0o077})
    finally:
        assert stop_up(stack) == 0
    assert _mode(settings.data_dir) == 0o700
    assert loose == {}, "readable by others"


@pytest.mark.timeout(180)
def test_an_existing_open_data_dir_is_warned_about_and_its_files_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    # As an older version left it: an (empty, hence valid) SQLite file readable by everyone.
    (data / "flowport.db").touch()
    (data / "flowport.db").chmod(0o644)
    settings = make_settings(data)
    stack = start_up(settings)
    try:
        text = "".join(stack.output)
        assert f"warning: data dir {data} has mode 0755" in text, text
        assert f"chmod 700 {data}" in text
        # Left as the operator made it (it may be shared on purpose); flowport's files are not.
        assert _mode(data) == 0o755
        for name in ("flowport.db", "flowport.db-wal", "flowport.db-shm", "envoy.json"):
            assert _mode(data / name) == 0o600, name
    finally:
        assert stop_up(stack) == 0


@pytest.fixture
def serving(settings: Settings) -> Iterator[ServeProcess]:
    server = ServeProcess(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_second_serve_on_the_same_data_dir_is_refused_naming_the_first(
    serving: ServeProcess, settings: Settings
) -> None:
    """On either store: with PostgreSQL the dir still holds the secrets key, admin key and Envoy's files."""
    assert serving.process is not None
    other_ports = make_settings(settings.data_dir, database_url=settings.database_url)
    result = _flowport("serve", other_ports)
    assert result.returncode == 2
    line = _one_line(result)
    assert line.startswith(f"flowport: data dir {settings.data_dir} (--data-dir) is in use by flowport serve ")
    assert f"(pid {serving.process.pid}, started " in line
    # The first one never noticed.
    assert serving.process.poll() is None
    with Client(settings.grpc_target, api_key=ADMIN_KEY) as client:
        assert client.gateway.GetInfo(gateway_pb2.GetInfoRequest(), timeout=5).version


@pytest.mark.timeout(180)
def test_the_lock_of_up_covers_its_server_and_refuses_others(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    stack = start_up(settings)  # its server started: the supervisor's lock did not stop it
    try:
        for command in ("serve", "up"):
            result = _flowport(command, make_settings(settings.data_dir))
            assert result.returncode == 2, result
            assert f"is in use by flowport up (pid {stack.process.pid}, " in _one_line(result)
        assert httpx.get(f"{settings.http_url}/health", timeout=10).status_code == 200
    finally:
        assert stop_up(stack) == 0


@pytest.mark.parametrize("command", ["serve", "up"])
def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path, command: str) -> None:
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    result = _flowport(command, make_settings(file))
    assert result.returncode == 2
    assert _one_line(result) == f"flowport: data dir {file} (--data-dir) is not a directory"


def _read_only(path: Path) -> tuple[str, ...]:
    """Make `path` read-only for the flowport process: a wrapper to run it with ((): file modes do)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return ()
    # Root writes through any mode: a read-only bind mount in a namespace of its own instead.
    unshare = shutil.which("unshare")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    wrapper = (str(unshare), "-rm", "sh", "-c", script, "sh", str(path)) if unshare else ()
    if not wrapper or subprocess.run([*wrapper, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root without unshare: no way to make a read-only directory")
    return wrapper


@pytest.mark.parametrize("command", ["serve", "up"])
def test_a_read_only_data_dir_is_one_line(tmp_path: Path, command: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    wrapper = _read_only(data)
    try:
        result = _flowport(command, make_settings(data), wrapper=wrapper)
    finally:
        data.chmod(0o700)
    assert result.returncode == 2
    assert _one_line(result) == f"flowport: data dir {data} (--data-dir) is not writable"
    assert not any(data.iterdir())
