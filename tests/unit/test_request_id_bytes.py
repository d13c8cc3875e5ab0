"""Bytes of remembered request ids per tenant (`--tenant-max-request-id-bytes`), on a real SQLite file
and a real PostgreSQL database: the triggers' totals, the purge round forgetting the oldest records of
a tenant past its cap and nobody else's, and what a client meets through the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, timestamp_pb2

from flowport.clients import AsyncClient
from flowport.server import app
from flowport.server.app import start, stop
from flowport.server.clock import now_us
from flowport.server.storage import SqlStore, request_ids
from flowport.server.storage.migrate import bundled
from flowport.server.storage.postgres import PostgresStore
from flowport.v1 import workflow_pb2

from ..conftest import ADMIN_KEY, make_settings, open_on

pytestmark = pytest.mark.timeout(120)

NOW = 1_700_000_000


@pytest.fixture
def store(engine_store: SqlStore) -> SqlStore:
    return engine_store


def _workflow(name: str, second: int, *, size: int = 0) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(
        workflow_id=name, description="x" * size, create_time=timestamp_pb2.Timestamp(seconds=NOW + second)
    )


async def _create(store: SqlStore, tenant: str, name: str, second: int, *, size: int = 0) -> int:
    """A workflow version made with request id `name`; its version."""
    result = await store.create_workflow(tenant, _workflow(name, second, size=size), (name, name.encode()))
    return workflow_pb2.Workflow.FromString(result.response).version


async def _stored(store: SqlStore, tenant: str) -> int:
    """The tenant's records, counted from the rows as migration 23 counts them."""

    def count(conn: Any) -> int:
        row = conn.execute(
            "SELECT sum(length(response) + length(request_id) + length(method) + 64) FROM idempotency WHERE tenant=?",
            (tenant,),
        ).fetchone()
        return int(row[0] or 0)

    return await store._read(count)


async def _remembered(store: SqlStore, tenant: str) -> list[str]:
    def ids(conn: Any) -> list[str]:
        rows = conn.execute("SELECT request_id FROM idempotency WHERE tenant=? ORDER BY request_id", (tenant,))
        return [str(row[0]) for row in rows.fetchall()]

    return await store._read(ids)


async def test_the_totals_follow_every_record_made_and_purged_per_tenant(store: SqlStore) -> None:
    for n in range(5):
        await _create(store, "t", f"r{n}", n, size=100 * n)
    await _create(store, "u", "r0", 0, size=5000)
    assert await store.request_id_bytes("t") == await _stored(store, "t") > 0
    assert await store.request_id_bytes("u") == await _stored(store, "u") > 5000
    assert await store.request_id_bytes("nobody") == 0
    # A replay makes no record: the total stays.
    before = await store.request_id_bytes("t")
    await _create(store, "t", "r1", 1, size=100)
    assert await store.request_id_bytes("t") == before
    # The day's purge, a batch per statement.
    await store.purge_expired(0, (NOW + 3) * 1_000_000)
    assert await _remembered(store, "t") == ["r3", "r4"]
    assert await store.request_id_bytes("t") == await _stored(store, "t") > 0
    assert await store.request_id_bytes("u") == 0 == await _stored(store, "u")


async def test_a_tenant_past_its_cap_forgets_its_oldest_down_to_keep_and_nobody_else_loses_any(
    store: SqlStore,
) -> None:
    for n in range(20):
        await _create(store, "greedy", f"g{n:02}", n, size=1000)
    for n in range(3):
        await _create(store, "quiet", f"q{n}", n, size=1000)
    limit = await store.request_id_bytes("greedy") // 2
    assert await store.request_id_bytes("quiet") < limit

    forgotten = await request_ids.forget_beyond(store, limit)

    kept = await _remembered(store, "greedy")
    assert forgotten == 20 - len(kept) > 0
    assert kept == [f"g{n:02}" for n in range(20 - len(kept), 20)], "the newest are the ones kept"
    assert await store.request_id_bytes("greedy") == await _stored(store, "greedy") <= limit * request_ids.KEEP
    assert await _remembered(store, "quiet") == ["q0", "q1", "q2"]
    assert await request_ids.forget_beyond(store, limit) == 0, "back under: nothing more goes"


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_records_made_before_the_migration_are_counted_once(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    old = await open_on(engine, request, tmp_path / "old.sqlite", [m for m in bundled() if m.version < 23])
    try:
        for n in range(3):
            await _create(old, "t", f"r{n}", n, size=100 * n)
    finally:
        await old.close()
    store = await open_on(engine, request, tmp_path / "old.sqlite")
    try:
        assert await store.request_id_bytes("t") == await _stored(store, "t") > 0
        await _create(store, "t", "r9", 9)
        assert await store.request_id_bytes("t") == await _stored(store, "t")
    finally:
        await store.close()


async def test_postgresql_shards_of_connections_gone_are_folded(request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("postgres_url")
    first = await PostgresStore.open(url)
    try:
        await _create(first, "t", "r0", 0, size=100)
    finally:
        await first.close()
    second = await PostgresStore.open(url)
    try:
        await _create(second, "t", "r1", 1, size=100)
        await second.fold_request_id_bytes()

        def shards(conn: Any) -> list[int]:
            return [int(r[0]) for r in conn.execute("SELECT shard FROM request_id_bytes WHERE tenant=?", ("t",))]

        kept = await second._read(shards)
        assert 0 in kept and len(kept) == 2, "the gone connection's row folded, the live one's kept"
        assert await second.request_id_bytes("t") == await _stored(second, "t")
    finally:
        await second.close()


async def test_through_the_api_a_forgotten_request_id_is_a_new_call_and_a_kept_one_replays(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, tenant_max_request_id_bytes=40_000)
    running = await start(settings)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            workflow = workflow_pb2.Workflow(workflow_id="w", name="w", description="x" * 5000)
            json_format.ParseDict(
                {"nodes": [{"name": "n", "type": "PythonCodeNode", "config": {"code": "result = {}"}}]}, workflow
            )
            versions = []
            for n in range(12):  # about 60 KB of answers
                made = await admin.workflows.CreateWorkflow(
                    workflow_pb2.CreateWorkflowRequest(workflow=workflow, request_id=f"make-{n}")
                )
                versions.append(made.version)
            assert await app.purge_expired_rows(running.store, settings, now_us()) > 0
            assert await running.store.request_id_bytes("default") <= 40_000 * request_ids.KEEP

            newest = await admin.workflows.CreateWorkflow(
                workflow_pb2.CreateWorkflowRequest(workflow=workflow, request_id="make-11")
            )
            assert newest.version == versions[-1], "a kept request id still replays its answer"
            oldest = await admin.workflows.CreateWorkflow(
                workflow_pb2.CreateWorkflowRequest(workflow=workflow, request_id="make-0")
            )
            assert oldest.version == versions[-1] + 1, "a forgotten one is a new call"
    finally:
        await stop(running, 1.0)


def test_the_purge_sizes_a_record_as_the_triggers_do() -> None:
    """The migration's formula is frozen with it, and the purge (which must not import the migration:
    SQLAlchemy and Alembic stay out of a default start) keeps its own copy: the two must agree."""
    from flowport.server.storage.migrations import v0023_request_id_bytes as migration

    assert migration.RECORD_BYTES.format(row="idempotency").replace("idempotency.", "") == request_ids._RECORD_BYTES
