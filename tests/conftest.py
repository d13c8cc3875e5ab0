"""Shared fixtures: free ports, settings in a temporary data dir, one real
flowport stack (server + Envoy via `flowport up`) per test session, and real
PostgreSQL and Redis servers (started only when a test asks for them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
import pytest

from flowport.clients import AsyncClient
from flowport.server.app import Running, start, stop
from flowport.server.settings import Settings
from flowport.server.storage import SqlStore
from flowport.server.storage.migrate import Migration
from flowport.server.supervisor import child_environment

from .backends import BackendUnavailable, PostgresServer, RedisServer, free_port, free_ports

# The admin key every test stack is started with (FLOWPORT_ADMIN_API_KEY).
ADMIN_KEY = "fpk_test-admin.0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN_HEADERS = {"x-api-key": ADMIN_KEY}
ADMIN_METADATA = (("x-api-key", ADMIN_KEY),)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on free loopback ports with data in a temporary folder, once per store engine.

    Every test that starts a server from this fixture runs on the embedded
    SQLite store and on PostgreSQL (a fresh database on the suite's server).
    """
    if request.param == "postgresql":
        return make_settings(tmp_path / "data", database_url=request.getfixturevalue("postgres_url"))
    return make_settings(tmp_path / "data")


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[Running]:
    """A server started in process on `settings` (each engine of the fixture), stopped after the test."""
    server = await start(settings)
    try:
        yield server
    finally:
        await stop(server, 1.0)


@pytest.fixture
async def admin(running: Running) -> AsyncIterator[AsyncClient]:
    """A client of `running` with the admin key."""
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
        yield client


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Loopback ports, small pools, loopback allowed for HTTP and SQL nodes (receivers, databases on 127.0.0.1)."""
    workers = overrides.get("workers", 1)
    assert isinstance(workers, int)
    values: dict[str, object] = {
        "data_dir": data_dir,
        "http_port": free_port(),
        # Worker n of --workers serves on these ports + n: each base starts a free run.
        "grpc_port": free_ports(workers),
        "websocket_port": free_ports(workers),
        "admin_port": free_port(),
        "metrics_port": free_port(),
        "shutdown_grace": 2.0,
        # Nothing to drain to in most tests: a SIGTERM stops at once (test_rolling_restart drains).
        "drain_seconds": 0.0,
        "sandbox_workers": 2,
        "http_allowlist": "127.0.0.1,localhost",
        "webhook_allowlist": "127.0.0.1,localhost",
        # SQL nodes and database resources reach the tests' PostgreSQL on loopback.
        "sql_allowlist": "127.0.0.1,localhost",
        "admin_api_key": ADMIN_KEY,
    }
    values.update(overrides)
    return Settings.load(values, environ={})


@dataclass
class Stack:
    """A running `flowport up`: its process, where to reach it, and what it prints (read as it
    comes, by a thread of its own: a pipe nobody reads fills, and the server then blocks on its
    next log line)."""

    process: subprocess.Popen[str]
    settings: Settings
    output: list[str]
    reader: threading.Thread | None = None
    # How much of `output` printed_since_read has handed out.
    handed: int = 0

    def printed_since_read(self) -> str:
        """What `flowport up` (the server and Envoy) has printed since it came up, or since the
        last call."""
        end = len(self.output)
        text = "".join(self.output[self.handed : end])
        self.handed = end
        return text

    @property
    def http(self) -> str:
        return self.settings.http_url

    @property
    def envoy_target(self) -> str:
        return f"127.0.0.1:{self.settings.http_port}"

    @property
    def grpc_target(self) -> str:
        return self.settings.grpc_target


def start_up(settings: Settings, timeout: float = 30.0, args: Sequence[str] = ()) -> Stack:
    """Run `flowport up` with `settings` (as FLOWPORT_* variables) and `args` (flags, which win over
    them) and wait for its "is up" line."""
    env = {k: v for k, v in child_environment(settings).items() if k != "FLOWPORT_ENVOY"}
    argv = [sys.executable, "-m", "flowport.clients.cli", "up", *args]
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
            reader = threading.Thread(target=output.extend, args=(process.stdout,), daemon=True)
            reader.start()
            return Stack(process, settings, output, reader, len(output))
    process.kill()
    raise AssertionError("flowport up did not come up:\n" + "".join(output))


def stop_up(stack: Stack, timeout: float = 20.0, sig: signal.Signals = signal.SIGINT) -> int:
    """Signal `flowport up` (SIGINT: as Ctrl-C would) and return its exit code. One that has not ended, with
    its output closed, within `timeout` is killed, and the failure shows the end of what it printed
    (whether it began its shutdown, and which process was left)."""
    stack.process.send_signal(sig)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        stack.process.wait(timeout)
    assert stack.reader is not None
    # The output closes once every process holding it (Envoy, the servers) has ended too.
    stack.reader.join(max(deadline - time.monotonic(), 0.0))
    if stack.process.poll() is None or stack.reader.is_alive():
        still = "still running" if stack.process.poll() is None else f"exited {stack.process.returncode}"
        stack.process.kill()
        stack.process.wait()
        raise AssertionError(
            f"flowport up ({still}) did not end within {timeout:g}s of SIGINT with its output closed;"
            f" the end of its output:\n{''.join(stack.output)[-4000:]}"
        )
    return stack.process.returncode


@pytest.fixture(autouse=True)
def _fresh_log_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty per-tenant budget of egress log lines (egress.LOG_BUDGET is
    the process's): one test's many refusals must not hold back the lines another reads."""
    from flowport.server import egress
    from flowport.server.observability.log_budget import LogBudget

    monkeypatch.setattr(egress, "LOG_BUDGET", LogBudget(per_minute=egress.LOG_LINES_PER_MINUTE))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real server + Envoy for the integration tests that only make calls."""
    # Many tests call it without a credential on purpose, all from 127.0.0.1: the slow-down
    # after repeated failures (max_login_attempts) would stall each of their 401s by seconds.
    running = start_up(make_settings(tmp_path_factory.mktemp("stack"), max_login_attempts=1000))
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

    def __init__(self, settings: Settings, runtime: dict[str, object] | None = None) -> None:
        self.settings = settings
        # Envoy runtime values for the test (a static layer), e.g. its tracer's flush settings.
        self.runtime = runtime
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        import json

        import httpx

        from flowport.server.envoy_binary import find_envoy
        from flowport.transcoder.envoy_config import render

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.settings.data_dir / "envoy.json"
        rendered = render(self.settings)
        if self.runtime:
            rendered["layered_runtime"] = {"layers": [{"name": "test", "static_layer": self.runtime}]}
        config.write_text(json.dumps(rendered))
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


# -- PostgreSQL and Redis ------------------------------------------------------
#
# Missing binaries fail the tests that need them (the README's test command
# installs both), unless FLOWPORT_SKIP_BACKENDS=1, which skips those tests.
# `-m "not backends"` deselects them whether or not the servers are installed.

Backend = TypeVar("Backend", PostgresServer, RedisServer)
BACKEND_FIXTURES = frozenset({"postgres_server", "postgres_url", "redis_server", "redis_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses a PostgreSQL or Redis fixture carries the `backends` marker."""
    for item in items:
        if BACKEND_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.backends)


def backend_missing(error: BackendUnavailable) -> NoReturn:
    """Fail the test that needs a missing server, or skip it when FLOWPORT_SKIP_BACKENDS=1."""
    if os.environ.get("FLOWPORT_SKIP_BACKENDS") == "1":
        pytest.skip(f"{error}; skipped because FLOWPORT_SKIP_BACKENDS=1")
    pytest.fail(
        f"{error}. The README's test command installs it; "
        "set FLOWPORT_SKIP_BACKENDS=1 to skip the tests that need it instead.",
        pytrace=False,
    )


def installed(backend: Callable[[], Backend]) -> Backend:
    """`backend()`, or the fail/skip of backend_missing when its binaries are not installed."""
    try:
        return backend()
    except BackendUnavailable as error:
        missing = error
    backend_missing(missing)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session, on a free loopback port, data in a temporary folder.

    `.url` is its `flowport` database; prefer `postgres_url` (a fresh database per test).
    """
    with installed(PostgresServer) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The url of an empty database of its own for this test, dropped afterwards."""
    url = postgres_server.new_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url.rsplit("/", 1)[1])


async def open_on(
    engine: str, request: pytest.FixtureRequest, sqlite_path: Path, migrations: Sequence[Migration] | None = None
) -> SqlStore:
    """A store on `engine`: the SQLite file `sqlite_path`, or the test's PostgreSQL database; migrated
    by `migrations` only (an earlier schema), or by every migration."""
    from flowport.server.storage import SqliteStore
    from flowport.server.storage.postgres import PostgresStore

    listed = None if migrations is None else list(migrations)
    if engine == "postgresql":
        return await PostgresStore.open(request.getfixturevalue("postgres_url"), listed)
    return await SqliteStore.open(sqlite_path, listed)


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """A store opened on each engine: a SQLite file, then a fresh PostgreSQL database."""
    opened = await open_on(request.param, request, tmp_path / "db.sqlite")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session, on a free loopback port, no persistence.

    Tests may `stop()` and `start()` it; prefer `redis_url`, which starts it
    again if an earlier test left it stopped and empties it first.
    """
    with installed(RedisServer) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running and empty, as a redis:// url."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url
