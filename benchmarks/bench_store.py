"""SQLite store: one session insert and one read, each a full store call."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from flowport.server.storage import SqliteStore
from flowport.v1 import execution_pb2, session_pb2


def _session(n: int) -> session_pb2.Session:
    s = session_pb2.Session(session_id=f"ses_{n:026d}", tenant="t", user_id="u")
    s.create_time.GetCurrentTime()
    s.expire_time.FromSeconds(s.create_time.seconds + 3600)
    return s


def test_insert_session(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    store = loop.run_until_complete(SqliteStore.open(tmp_path / "db.sqlite"))
    counter = itertools.count()
    benchmark(lambda: loop.run_until_complete(store.create_session("t", _session(next(counter)), None)))
    loop.run_until_complete(store.close())


def test_get_session(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    store = loop.run_until_complete(SqliteStore.open(tmp_path / "db.sqlite"))
    loop.run_until_complete(store.create_session("t", _session(1), None))
    now = time.time_ns() // 1000
    result = benchmark(lambda: loop.run_until_complete(store.get_session("t", _session(1).session_id, now)))
    assert result is not None
    loop.run_until_complete(store.close())


def test_write_execution_state(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """One state change of an execution: the write each node start and end costs."""
    store = loop.run_until_complete(SqliteStore.open(tmp_path / "db.sqlite"))
    execution = execution_pb2.Execution(
        execution_id="exe_bench", tenant="t", workflow_id="w", state=execution_pb2.Execution.STATE_RUNNING
    )
    execution.create_time.GetCurrentTime()
    loop.run_until_complete(store.insert_execution("t", execution, None))
    execution.outputs.update({"calc": {"result": {"n": 8}}})
    benchmark(lambda: loop.run_until_complete(store.save_execution(execution)))
    saved = loop.run_until_complete(store.get_execution("t", "exe_bench"))
    assert saved is not None and saved.outputs == execution.outputs
    loop.run_until_complete(store.close())
