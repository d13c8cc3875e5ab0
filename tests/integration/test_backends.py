"""The test infrastructure itself: the throwaway PostgreSQL and Redis servers
of tests/backends.py start on loopback, isolate tests, stop and restart as
asked, and leave no process or folder behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from .. import backends
from ..backends import BackendUnavailable, PostgresServer, RedisServer, child_pids, process_alive
from ..conftest import backend_missing

# -- PostgreSQL ------------------------------------------------------------------


async def test_postgres_accepts_a_connection_and_a_query_on_its_url(postgres_server: PostgresServer) -> None:
    assert postgres_server.url == f"postgresql://flowport@127.0.0.1:{postgres_server.port}/flowport"
    connection = await asyncpg.connect(postgres_server.url)
    try:
        assert await connection.fetchval("SELECT current_user") == "flowport"
        assert await connection.fetchval("SELECT current_database()") == "flowport"
        assert await connection.fetchval("SELECT 20 + 22") == 42
        assert await connection.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await connection.fetchval("SHOW fsync") == "off"
    finally:
        await connection.close()


async def test_each_new_database_is_empty_and_separate(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.new_database(), postgres_server.new_database()
    assert first != second
    names = [url.rsplit("/", 1)[1] for url in (first, second)]
    one = await asyncpg.connect(first)
    two = await asyncpg.connect(second)
    try:
        await one.execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('only in the first')")
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        assert await one.fetchval(tables) == 1
        assert await two.fetchval(tables) == 0
        await two.close()
        # Dropping disconnects whoever is still connected (`one` is).
        for name in names:
            postgres_server.drop_database(name)
    finally:
        one.terminate()
        two.terminate()
    listed = postgres_server.sql("SELECT datname FROM pg_database", database="postgres").split()
    assert "flowport" in listed
    assert not set(names) & set(listed)


async def test_the_postgres_url_fixture_is_a_fresh_empty_database(postgres_url: str) -> None:
    assert not postgres_url.endswith("/flowport")
    connection = await asyncpg.connect(postgres_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await connection.close()


def test_new_database_refuses_names_that_are_not_plain_identifiers(postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="must match"):
        postgres_server.new_database('x"; DROP DATABASE flowport; --')


def test_a_stopped_postgres_leaves_no_process_or_folder_behind(postgres_server: PostgresServer) -> None:
    # A server of its own (the session's one must keep running), from the same binaries.
    with PostgresServer(bin_dir=postgres_server.bin_dir) as server:
        postmaster = server.pid
        assert postmaster is not None and process_alive(postmaster)
        processes = {postmaster, *child_pids(postmaster)}
        assert len(processes) > 1  # checkpointer, walwriter, … run beside the postmaster
        folder = server.base_dir
        assert folder is not None and folder.is_dir()
    assert not [pid for pid in processes if process_alive(pid)]
    assert not folder.exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


# -- Redis -----------------------------------------------------------------------


def _ping(port: int) -> bytes:
    """PING with nothing but a socket, independent of RedisServer.command."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def test_redis_answers_ping_and_redis_url_is_empty(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert _ping(redis_server.port) == b"+PONG\r\n"
    assert redis_server.command("DBSIZE") == 0
    assert redis_server.command("SET", "greeting", "hello") == b"OK"
    assert redis_server.command("GET", "greeting") == b"hello"
    redis_server.flushall()
    assert redis_server.command("DBSIZE") == 0


@pytest.mark.parametrize("kill", [False, True])
def test_redis_stops_and_starts_again_on_the_same_port(redis_server: RedisServer, redis_url: str, kill: bool) -> None:
    port = redis_server.port
    assert redis_server.process is not None
    pid = redis_server.process.pid
    redis_server.command("SET", "k", "v")

    redis_server.stop(kill=kill)
    assert not redis_server.running
    assert not process_alive(pid)
    with pytest.raises(ConnectionRefusedError):
        _ping(port)

    redis_server.start()
    assert redis_server.port == port
    assert redis_server.url == redis_url
    assert _ping(port) == b"+PONG\r\n"
    assert redis_server.command("DBSIZE") == 0  # nothing is persisted across a restart


def test_a_closed_redis_leaves_no_process_or_folder_behind(redis_server: RedisServer) -> None:
    with RedisServer(binary=redis_server.binary) as server:
        assert server.process is not None
        pid = server.process.pid
        folder = server.base_dir
        assert folder is not None and folder.is_dir()
    assert server.process.returncode is not None
    assert not process_alive(pid)
    assert not folder.exists()


# -- an owner that dies without stopping them --------------------------------------

_OWNER = """
import sys, time
from tests.backends import PostgresServer, RedisServer
postgres, redis = PostgresServer(), RedisServer()
postgres.start()
redis.start()
print(postgres.pid, redis.process.pid, postgres.base_dir, redis.base_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(180)
def test_servers_whose_owner_is_killed_stop_and_leave_no_folder(
    postgres_server: PostgresServer, redis_server: RedisServer
) -> None:
    # The owner is killed as a test is by a hard timeout, or a benchmark run by SIGKILL: no stop() runs.
    root = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER], cwd=root, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert owner.stdout is not None
        postmaster, redis_pid, pg_dir, redis_dir = owner.stdout.readline().split()
        processes = {int(postmaster), int(redis_pid), *child_pids(int(postmaster))}
        assert all(process_alive(pid) for pid in processes)
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(10)
    deadline = time.monotonic() + 60
    while [pid for pid in processes if process_alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in processes if process_alive(pid)]
    while (Path(pg_dir).exists() or Path(redis_dir).exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(pg_dir).exists() and not Path(redis_dir).exists()


# -- missing binaries ------------------------------------------------------------


def test_missing_binaries_are_reported_as_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backends, "POSTGRES_BIN_GLOB", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="postgresql"):
        backends.find_postgres_bin()
    monkeypatch.setattr(backends, "REDIS_SERVER_PATHS", ())
    with pytest.raises(BackendUnavailable, match="redis-server"):
        backends.find_redis_server()
    with pytest.raises(BackendUnavailable, match="redis-server"):
        RedisServer()


def test_missing_binaries_fail_unless_skipping_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = BackendUnavailable("Redis is not installed")
    monkeypatch.delenv("FLOWPORT_SKIP_BACKENDS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="FLOWPORT_SKIP_BACKENDS=1"):
        backend_missing(missing)
    monkeypatch.setenv("FLOWPORT_SKIP_BACKENDS", "1")
    with pytest.raises(pytest.skip.Exception, match="Redis is not installed"):
        backend_missing(missing)
