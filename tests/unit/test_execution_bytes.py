"""Bytes of stored executions per tenant (`--tenant-max-execution-bytes`), on a real SQLite file and a
real PostgreSQL database: the triggers' totals, the trim of a tenant past its cap, the admission
check, and what a client meets through the API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from flowport.clients import ApiError, AsyncClient
from flowport.server import pagination
from flowport.server.app import start, stop
from flowport.server.engine import execution_bytes
from flowport.server.engine.execution_bytes import ExecutionBytesCap
from flowport.server.errors import ResourceExhausted
from flowport.server.limits import MAX_PAGE_BYTES
from flowport.server.storage import SqlStore
from flowport.server.storage.migrate import bundled
from flowport.server.storage.postgres import PostgresStore
from flowport.v1 import apikey_pb2, execution_pb2, workflow_pb2
from flowport.v1.execution_pb2 import Execution

from ..conftest import ADMIN_KEY, make_settings, open_on

NOW = 1_700_000_000


@pytest.fixture
def store(engine_store: SqlStore) -> SqlStore:
    return engine_store


def _execution(n: int, state: int, *, size: int = 0, tenant: str = "t") -> Execution:
    inputs = struct_pb2.Struct()
    if size:
        inputs.update({"pad": "x" * size})
    return Execution(
        execution_id=f"{tenant}-e{n:04}",
        workflow_id="w",
        state=state,
        inputs=inputs,
        create_time=timestamp_pb2.Timestamp(seconds=NOW + n),
        tenant=tenant,
    )


async def _stored(store: SqlStore, tenant: str) -> int:
    """The bytes of `tenant`'s executions, counted from the rows themselves."""

    def count(conn: object) -> int:
        row = conn.execute("SELECT sum(length(body)) FROM executions WHERE tenant=?", (tenant,)).fetchone()  # type: ignore[attr-defined]
        return int(row[0] or 0)

    return await store._read(count)


async def test_the_totals_follow_every_insert_rewrite_and_removal_per_tenant(store: SqlStore) -> None:
    for n in range(6):
        await store.insert_execution("t", _execution(n, Execution.STATE_SUCCEEDED, size=100 * n), None)
    await store.insert_execution("u", _execution(0, Execution.STATE_RUNNING, size=5000, tenant="u"), None)
    assert await store.execution_bytes("t") == await _stored(store, "t") > 0
    assert await store.execution_bytes("u") == await _stored(store, "u") > 5000
    assert await store.execution_bytes("nobody") == 0

    # A rewrite that grows, one that shrinks, one of the same size.
    grown = _execution(0, Execution.STATE_SUCCEEDED, tenant="u", size=9000)
    await store.save_execution(grown)
    assert await store.execution_bytes("u") == await _stored(store, "u") > 9000
    await store.save_execution(_execution(0, Execution.STATE_SUCCEEDED, tenant="u", size=10))
    await store.save_execution(_execution(0, Execution.STATE_FAILED, tenant="u", size=10))
    assert await store.execution_bytes("u") == await _stored(store, "u") < 100
    # The retention purge's deletes, a batch per statement.
    assert await store.purge_ended_executions((NOW + 3) * 1_000_000, batch=1000) == 4  # t-e0..e2, u-e0
    assert await store.execution_bytes("t") == await _stored(store, "t") > 0
    assert await store.execution_bytes("u") == 0 == await _stored(store, "u")


async def test_a_trim_removes_the_oldest_ended_executions_down_to_keep_and_nothing_else(store: SqlStore) -> None:
    for n in range(20):
        await store.insert_execution("t", _execution(n, Execution.STATE_SUCCEEDED, size=1000), None)
    running = _execution(99, Execution.STATE_RUNNING, size=1000)
    running.create_time.seconds = NOW - 10  # the oldest of all: still never removed
    await store.insert_execution("t", running, None)
    await store.insert_execution("other", _execution(0, Execution.STATE_SUCCEEDED, size=50_000, tenant="other"), None)
    total = await store.execution_bytes("t")
    limit = total // 2
    assert sorted(await store.tenants_over_execution_bytes(limit)) == ["other", "t"]

    removed = await execution_bytes.trim(store, "t", limit)
    left = await store.execution_bytes("t")
    assert left == await _stored(store, "t")
    assert left <= limit * execution_bytes.KEEP < left + 1100, "removed only what was needed"
    listed = await store.list_executions("t", workflow_id="", session_id="", state=0, after=None, limit=100)
    ids = sorted(e.execution_id for e in listed)
    assert len(ids) == 21 - removed and "t-e0099" in ids
    assert ids[0] == f"t-e{removed:04}", "the oldest ended ones went first"
    # A tenant holding only running executions keeps them, past its cap or not.
    assert await execution_bytes.trim(store, "t", 1) == 20 - removed
    listed = await store.list_executions("t", workflow_id="", session_id="", state=0, after=None, limit=100)
    assert [e.execution_id for e in listed] == ["t-e0099"]
    assert await store.get_execution("other", "other-e0000") is not None


async def test_a_tenant_past_its_cap_is_refused_until_the_trim_it_started_makes_room(store: SqlStore) -> None:
    clock = [0.0]
    cap = ExecutionBytesCap(store, 10_000, clock=lambda: clock[0])
    try:
        assert not await cap.over("t")
        for n in range(12):
            await store.insert_execution("t", _execution(n, Execution.STATE_SUCCEEDED, size=1000), None)
        assert not await cap.over("t"), "a total is used for REFRESH seconds"
        clock[0] += execution_bytes.REFRESH
        assert await cap.over("t")
        assert not await cap.over("other"), "other tenants are not touched"
        refused = cap.refuse("t")
        assert isinstance(refused, ResourceExhausted) and refused.reason == "TENANT_QUOTA"
        assert refused.metadata == {"kind": "executions", "tenant_max_execution_bytes": "10000"}
        trimming = cap._trims["t"]  # the trim the refusal started
        assert cap.refuse("t").reason == "TENANT_QUOTA"
        assert cap._trims["t"] is trimming, "one trim at a time"
        async with asyncio.timeout(30):
            assert await trimming >= 3
        assert await store.execution_bytes("t") <= 9000
        assert not await cap.over("t"), "the room made is seen at once"
    finally:
        await cap.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_executions_stored_before_the_migration_are_counted_once(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    old = await open_on(engine, request, tmp_path / "old.sqlite", [m for m in bundled() if m.version < 22])
    try:
        for n in range(3):
            await old.insert_execution("t", _execution(n, Execution.STATE_SUCCEEDED, size=100 * n), None)
        await old.insert_execution("u", _execution(0, Execution.STATE_RUNNING, tenant="u"), None)
    finally:
        await old.close()
    store = await open_on(engine, request, tmp_path / "old.sqlite")
    try:
        for tenant in ("t", "u"):
            assert await store.execution_bytes(tenant) == await _stored(store, tenant) > 0
        await store.insert_execution("t", _execution(9, Execution.STATE_SUCCEEDED), None)
        assert await store.execution_bytes("t") == await _stored(store, "t")
    finally:
        await store.close()


def _workflow() -> workflow_pb2.Workflow:
    workflow = workflow_pb2.Workflow(workflow_id="pad", name="pad")
    json_format.ParseDict(
        {"nodes": [{"name": "n", "type": "PythonCodeNode", "config": {"code": "result = {'pad': 'x' * 2000}"}}]},
        workflow,
    )
    return workflow


async def test_through_the_api_a_tenant_at_its_cap_gets_429_and_keeps_its_newest_results(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, tenant_max_execution_bytes=20_000))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            other_key = await admin.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="other", roles=["admin"]))
            )
            await admin.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_workflow()))
            run = execution_pb2.CreateExecutionRequest(workflow_id="pad", wait=True)
            first = await admin.executions.CreateExecution(
                execution_pb2.CreateExecutionRequest(workflow_id="pad", wait=True, request_id="first-run")
            )
            refused: ApiError | None = None
            async with asyncio.timeout(60):
                for _ in range(200):
                    try:
                        await admin.executions.CreateExecution(run)
                    except ApiError as exc:
                        refused = exc
                        break
                    await asyncio.sleep(0.02)
            assert refused is not None, "never refused"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.reason == "TENANT_QUOTA"
            assert "bytes of stored executions" in refused.message

            # Another tenant runs as before.
            async with AsyncClient(f"127.0.0.1:{running.port}", api_key=other_key.key) as other:
                await other.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_workflow()))
                done = await other.executions.CreateExecution(run)
                assert done.state == Execution.STATE_SUCCEEDED

            # The refusal started the trim: the tenant runs again, and its oldest result is gone.
            async with asyncio.timeout(30):
                while True:
                    try:
                        newest = await admin.executions.CreateExecution(run)
                        break
                    except ApiError as exc:
                        assert exc.reason == "TENANT_QUOTA", exc
                        await asyncio.sleep(0.2)
            assert newest.state == Execution.STATE_SUCCEEDED
            with pytest.raises(ApiError) as gone:
                await admin.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=first.execution_id))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            # Its request_id still within the day: the retry is told it was removed, not run again.
            with pytest.raises(ApiError) as replay:
                await admin.executions.CreateExecution(
                    execution_pb2.CreateExecutionRequest(workflow_id="pad", wait=True, request_id="first-run")
                )
            assert (replay.value.code(), replay.value.reason) == (grpc.StatusCode.NOT_FOUND, "EXECUTION_REMOVED")
            assert "first-run" not in replay.value.message
    finally:
        await stop(running, 1.0)


async def test_a_page_reads_no_more_bodies_than_its_byte_budget_and_walks_them_all(store: SqlStore) -> None:
    """page_size=1000 over executions of 1.5 MiB each: the store reads the few a 4 MiB page holds
    (and the one that passes it), not a thousand, and the pages still walk every execution once."""
    big = 1_500_000
    for n in range(7):
        await store.insert_execution("t", _execution(n, Execution.STATE_SUCCEEDED, size=big), None)
    await store.insert_execution("t", _execution(7, Execution.STATE_SUCCEEDED, size=5_000_000), None)  # alone > 4 MiB
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        rows = await store.list_executions("t", workflow_id="", session_id="", state=0, after=after, limit=1001)
        assert len(rows) <= 4, "at most the page's bodies and the one past it"
        kept, token = pagination.page(rows, 1000, {}, lambda e: [e.create_time.ToMicroseconds(), e.execution_id])
        assert sum(e.ByteSize() for e in kept) <= MAX_PAGE_BYTES or len(kept) == 1
        seen += [e.execution_id for e in kept]
        pages += 1
        if not token:
            break
        after = pagination.cursor_time_id(pagination.decode_token(token, {}))
    assert seen == [f"t-e{n:04}" for n in range(7, -1, -1)], "newest first, each once"
    assert pages >= 4


async def test_postgresql_shards_of_connections_gone_are_folded_and_totals_kept(request: pytest.FixtureRequest) -> None:
    """Each PostgreSQL connection adds to its own backend's row (no two live ones share a row, so no
    lock is waited on or deadlocked over); the purge folds those of connections gone into shard 0."""
    url = request.getfixturevalue("postgres_url")
    first = await PostgresStore.open(url)
    try:
        for n in range(3):
            await first.insert_execution("t", _execution(n, Execution.STATE_SUCCEEDED, size=100), None)
        total = await first.execution_bytes("t")
    finally:
        await first.close()
    second = await PostgresStore.open(url)
    try:
        await second.insert_execution("t", _execution(9, Execution.STATE_SUCCEEDED, size=100), None)
        await second.fold_execution_bytes()

        def shards(conn: Any) -> list[int]:
            return [int(r[0]) for r in conn.execute("SELECT shard FROM execution_bytes WHERE tenant=?", ("t",))]

        kept = await second._read(shards)
        assert 0 in kept and len(kept) == 2, "the gone connection's row folded, the live one's kept"
        assert await second.execution_bytes("t") == await _stored(second, "t") > total
    finally:
        await second.close()
