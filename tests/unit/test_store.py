"""The store on a real SQLite file and on a real PostgreSQL database: sessions,
idempotency, expiry, migrations."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from google.protobuf import timestamp_pb2

from flowport.server.events.bus import BusEvent
from flowport.server.storage import Deletion, IdempotencyConflict, MigrationError, SqliteStore, SqlStore, shared_reads
from flowport.server.storage.migrate import Migration, bundled, migrate
from flowport.server.storage.postgres import PostgresStore
from flowport.server.storage.sqlite_snapshot import create_from_snapshot, render, snapshot_text
from flowport.v1 import execution_pb2, session_pb2
from flowport.v1.execution_pb2 import Execution

NOW = 1_700_000_000_000_000
HOUR = 3600 * 1_000_000


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def session(
    sid: str, *, tenant: str = "t1", created: int = NOW, ttl: int = HOUR, user: str = "u"
) -> session_pb2.Session:
    return session_pb2.Session(
        session_id=sid, tenant=tenant, user_id=user, create_time=_ts(created), expire_time=_ts(created + ttl)
    )


Opener = Callable[..., Awaitable[SqlStore]]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the store under test: the SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        return lambda migrations=None, **options: PostgresStore.open(url, migrations, **options)
    return lambda migrations=None, **options: SqliteStore.open(tmp_path / "db.sqlite", migrations)


async def test_sessions_round_trip_and_are_scoped_by_tenant(opener: Opener) -> None:
    store = await opener()
    try:
        await store.create_session("t1", session("s1"), None)
        got = await store.get_session("t1", "s1", NOW)
        assert got is not None and got.session_id == "s1" and got.user_id == "u"
        assert await store.get_session("t2", "s1", NOW) is None
        assert await store.delete_session("t2", "s1", NOW) is Deletion.MISSING
        assert await store.delete_session("t1", "s1", NOW) is Deletion.DELETED
        assert await store.get_session("t1", "s1", NOW) is None
    finally:
        await store.close()


async def test_expired_sessions_are_invisible_and_purged(opener: Opener) -> None:
    store = await opener()
    try:
        await store.create_session("t1", session("old", ttl=HOUR), None)
        await store.create_session("t1", session("new", ttl=3 * HOUR), None)
        later = NOW + 2 * HOUR
        assert await store.get_session("t1", "old", later) is None
        assert [
            s.session_id for s in await store.list_sessions("t1", user_id="", after=None, limit=10, now_us=later)
        ] == ["new"]
        assert await store.count_active_sessions(later) == 1
        assert await store.purge_expired(later, idempotency_before_us=0) == 1
        assert await store.count_active_sessions(NOW) == 1
    finally:
        await store.close()


async def test_list_is_newest_first_and_resumes_after_a_cursor(opener: Opener) -> None:
    store = await opener()
    try:
        for i in range(5):
            await store.create_session("t1", session(f"s{i}", created=NOW + i, user="a" if i % 2 else "b"), None)
        first = await store.list_sessions("t1", user_id="", after=None, limit=2, now_us=NOW)
        assert [s.session_id for s in first] == ["s4", "s3"]
        rest = await store.list_sessions("t1", user_id="", after=(NOW + 3, "s3"), limit=10, now_us=NOW)
        assert [s.session_id for s in rest] == ["s2", "s1", "s0"]
        only_a = await store.list_sessions("t1", user_id="a", after=None, limit=10, now_us=NOW)
        assert [s.session_id for s in only_a] == ["s3", "s1"]
    finally:
        await store.close()


async def test_idempotent_create_replays_the_first_result_and_refuses_another_body(opener: Opener) -> None:
    store = await opener()
    try:
        first = await store.create_session("t1", session("s1"), ("key", b"hash-a"))
        again = await store.create_session("t1", session("s2"), ("key", b"hash-a"))
        assert not first.replayed and again.replayed
        assert session_pb2.Session.FromString(again.response).session_id == "s1"
        assert await store.get_session("t1", "s2", NOW) is None, "a replay must not create a second session"
        with pytest.raises(IdempotencyConflict):
            await store.create_session("t1", session("s3"), ("key", b"hash-b"))
        # Keys are per tenant: another tenant's identical key is independent.
        other = await store.create_session("t2", session("s4", tenant="t2"), ("key", b"hash-b"))
        assert not other.replayed
    finally:
        await store.close()


async def test_a_write_failing_half_way_in_a_batch_undoes_only_itself(opener: Opener) -> None:
    """Writes queued together share one transaction; one that raises after changing a row must
    leave no trace, while the writes before and after it in the batch commit."""
    # Without the workflow cache's polling, whose acknowledgements are writes of their own.
    store = await opener(keep_workflows=False)
    try:

        def half_done(conn: Any) -> None:
            conn.execute("UPDATE sessions SET user_id='half' WHERE session_id='s1'")
            raise RuntimeError("failed after its first statement")

        await store.create_session("t1", session("s1"), None)
        rename = "UPDATE sessions SET user_id=? WHERE session_id=?"
        # Enqueued in one loop turn, so they are committed as one batch.
        writes = [
            store._group.enqueue(lambda conn: conn.execute(rename, ("before", "s0")).rowcount),
            store._group.enqueue(half_done),
            store._group.enqueue(lambda conn: conn.execute(rename, ("after", "s1")).rowcount),
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert results[0] == 0 and results[2] == 1
        assert isinstance(results[1], RuntimeError)
        row = await store._lookup("SELECT user_id FROM sessions WHERE session_id=?", ("s1",))
        assert row == ("after",)
        batches, _ = store.write_batches
        assert batches == 2, "the session's create, then the three writes in one batch"
    finally:
        await store.close()


async def test_logged_events_read_back_exactly(opener: Opener) -> None:
    """A batch of events (written on PostgreSQL as one JSON parameter) reads back field for field."""
    store = await opener()
    try:
        data = {"text": 'naïve "quoted" \\ back\nslash \u0000 nul \u2028 \U0001f600', "n": [1, 2.5, None, True]}
        at = 1_700_000_000_123_456_000  # whole microseconds: the log keeps those
        events = [
            BusEvent(str(10 + n), "node.completed", at + n * 1000, "t1", "s", "w", f"e{n}", data) for n in range(3)
        ]
        events.append(BusEvent("20", "execution.started", at, "t1"))
        await store.append_events(events)
        await store.append_events([])
        read = await store.read_events("t1", after=0, limit=10)
        assert read == events
    finally:
        await store.close()


async def test_unfinished_executions_are_the_callers_newest_pending_and_running(opener: Opener) -> None:
    store = await opener()
    try:
        alice = session("s-alice")
        alice.creator = "key-alice"
        await store.create_session("t1", alice, None)
        made = [
            ("e0", "t1", "", Execution.STATE_RUNNING),
            ("e1", "t1", "", Execution.STATE_SUCCEEDED),
            ("e2", "t1", "s-alice", Execution.STATE_PENDING),
            ("e3", "t2", "", Execution.STATE_RUNNING),
            ("e4", "t1", "", Execution.STATE_FAILED),
            ("e5", "t1", "", Execution.STATE_PENDING),
        ]
        for n, (eid, tenant, sid, state) in enumerate(made):
            execution = Execution(
                execution_id=eid, workflow_id="w", session_id=sid, state=state, create_time=_ts(NOW + n)
            )
            await store.insert_execution(tenant, execution, None)
        rows = await store.unfinished_executions("t1", limit=10)
        assert rows == [
            ("e5", Execution.STATE_PENDING, "w", "", NOW + 5),
            ("e2", Execution.STATE_PENDING, "w", "s-alice", NOW + 2),
            ("e0", Execution.STATE_RUNNING, "w", "", NOW),
        ]
        assert [r[0] for r in await store.unfinished_executions("t1", limit=2)] == ["e5", "e2"]
        # Another credential sees executions outside sessions, not those in alice's session.
        assert [r[0] for r in await store.unfinished_executions("t1", limit=10, session_creator="key-bob")] == [
            "e5",
            "e0",
        ]
        assert [r[0] for r in await store.unfinished_executions("t2", limit=10)] == ["e3"]
    finally:
        await store.close()


async def test_ended_executions_past_retention_are_purged_oldest_first_in_batches(opener: Opener) -> None:
    store = await opener()
    try:
        made = [
            ("old-ok", Execution.STATE_SUCCEEDED, NOW),
            ("old-failed", Execution.STATE_FAILED, NOW + 1),
            ("old-cancelled", Execution.STATE_CANCELLED, NOW + 2),
            ("old-running", Execution.STATE_RUNNING, NOW + 3),
            ("old-pending", Execution.STATE_PENDING, NOW + 4),
            ("new-ok", Execution.STATE_SUCCEEDED, NOW + 2 * HOUR),
        ]
        for eid, state, created in made:
            execution = Execution(execution_id=eid, workflow_id="w", state=state, create_time=_ts(created))
            await store.insert_execution("t1" if eid != "old-failed" else "t2", execution, None)
        before = NOW + HOUR
        assert await store.purge_ended_executions(before, batch=2) == 2  # the two oldest ended, of two tenants
        assert (
            await store.get_execution("t1", "old-ok") is None and await store.get_execution("t2", "old-failed") is None
        )
        assert await store.get_execution("t1", "old-cancelled") is not None
        assert await store.purge_ended_executions(before, batch=2) == 1
        assert await store.purge_ended_executions(before, batch=2) == 0
        # Running and waiting executions stay however old; so does everything younger.
        left = {
            e.execution_id
            for e in await store.list_executions("t1", workflow_id="", session_id="", state=0, after=None, limit=10)
        }
        assert left == {"old-running", "old-pending", "new-ok"}
    finally:
        await store.close()


async def test_leases_are_claimed_once_renewed_and_released(opener: Opener) -> None:
    store = await opener()
    try:
        queued, held = (
            execution_pb2.Execution(
                execution_id=eid,
                tenant="t1",
                workflow_id="w",
                state=execution_pb2.Execution.STATE_PENDING,
                create_time=_ts(NOW),
            )
            for eid in ("exe_queued", "exe_held")
        )
        await store.insert_execution("t1", queued, None, owner="", lease_until_us=NOW + HOUR)
        await store.insert_execution("t1", held, None, owner="a", lease_until_us=NOW + HOUR)
        claim = store.claim_execution
        # Unowned (queued) is taken at once, by one claimant only, and only in its tenant.
        assert await claim("t2", "exe_queued", "b", now_us=NOW, lease_until_us=NOW + 2 * HOUR) is None
        got = await claim("t1", "exe_queued", "b", now_us=NOW, lease_until_us=NOW + 2 * HOUR)
        assert got is not None and got.execution_id == "exe_queued"
        assert await claim("t1", "exe_queued", "c", now_us=NOW, lease_until_us=NOW + 2 * HOUR) is None
        assert await store.execution_lease("t1", "exe_queued") == ("b", NOW + 2 * HOUR)
        # A live lease holds until it ends, then anyone may take it.
        assert await claim("t1", "exe_held", "b", now_us=NOW, lease_until_us=NOW + 2 * HOUR) is None
        assert await store.claim_executions("b", now_us=NOW, lease_until_us=NOW + 2 * HOUR) == []
        await store.renew_leases("a", NOW + 3 * HOUR, ["exe_held"])
        await store.renew_leases("a", NOW + 9 * HOUR, [])  # nothing running: nothing renewed
        assert await store.execution_lease("t1", "exe_held") == ("a", NOW + 3 * HOUR)
        assert await store.claim_executions("b", now_us=NOW + 2 * HOUR + 1, lease_until_us=NOW + 4 * HOUR) == [got], (
            "only b's own (expired) lease is taken; a renewed"
        )
        await store.release_leases("a")
        assert await claim("t1", "exe_held", "c", now_us=NOW, lease_until_us=NOW + HOUR) is not None
        # An execution that has ended is never claimed.
        held.state = execution_pb2.Execution.STATE_SUCCEEDED
        await store.save_execution(held)
        assert await claim("t1", "exe_held", "d", now_us=NOW * 2, lease_until_us=NOW * 3) is None
        assert await claim("t1", "exe_missing", "d", now_us=NOW, lease_until_us=NOW + HOUR) is None
    finally:
        await store.close()


async def test_data_survives_reopening_and_migrations_are_not_reapplied(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await SqliteStore.open(path)
    await store.create_session("t1", session("kept"), None)
    await store.close()
    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.get_session("t1", "kept", NOW) is not None
    finally:
        await reopened.close()
    with sqlite3.connect(path) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert versions == [m.version for m in bundled()]


def test_the_sqlite_schema_snapshot_is_current() -> None:
    # A new migration without a new snapshot: run python -m flowport.server.storage.sqlite_snapshot.
    assert render() == snapshot_text(), "stale: python -m flowport.server.storage.sqlite_snapshot rewrites it"


def test_a_new_file_from_the_snapshot_equals_one_migrated_step_by_step(tmp_path: Path) -> None:
    from_snapshot, stepwise = tmp_path / "snapshot.db", tmp_path / "stepwise.db"
    assert migrate(f"sqlite:///{from_snapshot}", bundled()) == [m.version for m in bundled()]
    migrate(f"sqlite:///{stepwise}", bundled(), snapshot=False)

    def dump(path: Path) -> list[str]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
            return [*conn.iterdump(), *map(str, rows)]

    def without_times(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.startswith('INSERT INTO "schema_migrations"')]

    assert without_times(dump(from_snapshot)) == without_times(dump(stepwise))
    # A file that is not empty is never made over from the snapshot.
    assert create_from_snapshot(stepwise, bundled()) is None
    # Nor is one for another set of migrations (then the migrations run).
    assert create_from_snapshot(tmp_path / "other.db", bundled()[:-1]) is None


def test_an_in_memory_database_takes_the_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert migrate("sqlite:///:memory:", bundled()) == [m.version for m in bundled()]
    assert not (tmp_path / ":memory:").exists()  # no file of that name made from the snapshot


async def test_an_existing_file_is_upgraded_by_new_migrations_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await SqliteStore.open(path)
    await store.create_session("t1", session("before"), None)
    await store.close()
    upgrade = Migration(
        len(bundled()) + 1,
        "add_note",
        lambda op: op.add_column("sessions", sa.Column("note", sa.Text, nullable=False, server_default="")),
    )
    upgraded = await SqliteStore.open(path, [*bundled(), upgrade])
    try:
        assert await upgraded.get_session("t1", "before", NOW) is not None
    finally:
        await upgraded.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT note FROM sessions WHERE session_id='before'").fetchone() == ("",)
        assert max(r[0] for r in conn.execute("SELECT version FROM schema_migrations")) == upgrade.version


async def test_a_database_from_a_newer_flowport_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    newer = Migration(len(bundled()) + 1, "future", lambda op: op.create_table("future", sa.Column("x", sa.Integer)))
    store = await SqliteStore.open(path, [*bundled(), newer])
    await store.close()
    with pytest.raises(MigrationError, match="newer than this flowport knows"):
        await SqliteStore.open(path)


async def test_a_failing_migration_leaves_the_schema_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    def broken_upgrade(op: Operations) -> None:
        op.create_table("half", sa.Column("x", sa.Integer))
        op.execute("NOT SQL")

    broken = Migration(len(bundled()) + 1, "broken", broken_upgrade)
    with pytest.raises(MigrationError, match="broken failed"):
        await SqliteStore.open(path, [*bundled(), broken])
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert "half" not in tables
    assert versions == [m.version for m in bundled()]


async def test_postgres_refuses_a_newer_schema_and_rolls_back_a_failing_migration(postgres_url: str) -> None:
    newer = Migration(len(bundled()) + 1, "future", lambda op: op.create_table("future", sa.Column("x", sa.Integer)))
    store = await PostgresStore.open(postgres_url, [*bundled(), newer])
    await store.create_session("t1", session("kept"), None)
    await store.close()
    with pytest.raises(MigrationError, match="newer than this flowport knows"):
        await PostgresStore.open(postgres_url)

    def broken_upgrade(op: Operations) -> None:
        op.create_table("half", sa.Column("x", sa.Integer))
        op.execute("NOT SQL")

    broken = Migration(len(bundled()) + 2, "broken", broken_upgrade)
    with pytest.raises(MigrationError, match="broken failed"):
        await PostgresStore.open(postgres_url, [*bundled(), newer, broken])
    reopened = await PostgresStore.open(postgres_url, [*bundled(), newer])
    try:
        assert await reopened.get_session("t1", "kept", NOW) is not None
        tables = await reopened._read(
            lambda conn: conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'").fetchall()
        )
        assert "half" not in {t[0] for t in tables} and "future" in {t[0] for t in tables}
    finally:
        await reopened.close()


async def test_the_audit_log_is_append_only_on_postgres_too(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    try:
        row = ("aud_1", NOW, "auth.failed", "UNAUTHENTICATED", "t1", "", "", b"")
        await store._write(lambda conn: conn.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row))
        for statement in ("UPDATE audit_log SET code='OK'", "DELETE FROM audit_log"):
            with pytest.raises(Exception, match="append-only"):
                await store._write(lambda conn, sql=statement: conn.execute(sql))  # type: ignore[misc]
    finally:
        await store.close()


async def test_two_processes_racing_on_one_request_id_get_one_result(postgres_url: str) -> None:
    # Two stores stand for two processes: both look the key up, find nothing,
    # and insert; the second insert waits for the first to commit, finds the
    # record, and answers with the first call's result.
    first, second = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        for round_ in range(5):
            key = (f"race-{round_}", b"same-body")
            results = await asyncio.gather(
                first.create_session("t1", session(f"a{round_}"), key),
                second.create_session("t1", session(f"b{round_}"), key),
            )
            ids = {session_pb2.Session.FromString(r.response).session_id for r in results}
            assert len(ids) == 1, results
            assert sorted(r.replayed for r in results) == [False, True]
        rows = await first.list_sessions("t1", user_id="", after=None, limit=100, now_us=NOW)
        assert len(rows) == 5
    finally:
        await first.close()
        await second.close()


async def test_sessions_created_counts_every_process_and_survives_delete_and_purge(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each count is read again right after the writes that change it: none is kept (shared_reads.py
    # keeps a slow count's answer a while, and a count on PostgreSQL may be slow enough).
    monkeypatch.setattr(shared_reads, "KEEP_FACTOR", 0)
    # Two stores on one database stand for two server processes.
    first, second = await opener(), await opener()
    try:
        await first.create_session("t1", session("a"), None)
        await second.create_session("t1", session("b"), None)
        await second.create_session("t2", session("c", tenant="t2"), None)
        key = ("req-1", b"body")
        assert not (await first.create_session("t1", session("d"), key)).replayed
        assert (await second.create_session("t1", session("d2"), key)).replayed, "a replay creates nothing"
        counts = [await store.count_sessions_created(t) for store in (first, second) for t in ("t1", "t2", None)]
        assert counts == [3, 1, 4] * 2
        assert await second.delete_session("t1", "a", NOW) is Deletion.DELETED
        assert await first.get_session("t1", "a", NOW) is None, "a deleted session is gone at once"
        assert await first.count_sessions("t1", NOW) == 2
        # Both processes purge at once: every removed row is counted, and once.
        later = NOW + 2 * HOUR
        removed = await asyncio.gather(
            first.purge_expired(later, idempotency_before_us=0), second.purge_expired(later, idempotency_before_us=0)
        )
        assert sum(removed) == 4
        assert await first.count_sessions(None, later) == 0
        assert [await second.count_sessions_created(t) for t in ("t1", "t2", None)] == [3, 1, 4]
        await first.create_session("t2", session("e", tenant="t2", created=later), None)
        assert [await first.count_sessions_created(t) for t in ("t1", "t2", None)] == [3, 2, 5]
    finally:
        await first.close()
        await second.close()
