"""Workflow rows kept in memory by processes sharing a real PostgreSQL database: a create or delete
through one process is seen by every other before it answers, and a process that stops polling
stops using what it keeps before the writers stop waiting for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from google.protobuf import timestamp_pb2

from flowport.server.storage import workflow_cache
from flowport.server.storage.postgres import PostgresStore
from flowport.server.storage.workflow_cache import WorkflowCache
from flowport.v1 import workflow_pb2

NOW = 1_700_000_000_000_000


@pytest.fixture
async def two(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two server processes would hold them."""
    first = await PostgresStore.open(postgres_url)
    second = await PostgresStore.open(postgres_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def _workflow(description: str) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(
        workflow_id="w", description=description, create_time=timestamp_pb2.Timestamp(seconds=NOW // 10**6)
    )


def _cache(store: PostgresStore) -> WorkflowCache:
    cache = store._workflow_cache
    assert cache is not None, "a PostgreSQL store keeps workflows"
    return cache


async def test_a_change_through_one_process_is_seen_by_the_other_when_it_answers(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    runner, editor = two
    await editor.create_workflow("t", _workflow("first"), None)
    first = await runner.get_workflow("t", "w")
    assert first is not None and first.version == 1
    hits = _cache(runner).hits
    again = await runner.get_workflow("t", "w")
    assert again == first and _cache(runner).hits == hits + 1, "the second read is served from memory"
    # No wait of the test's own: the create answers once the runner has dropped its copy.
    await editor.create_workflow("t", _workflow("second"), None)
    latest = await runner.get_workflow("t", "w")
    assert latest is not None and (latest.version, latest.description) == (2, "second")
    pinned = await runner.get_workflow("t", "w", 1)
    assert pinned is not None and pinned.description == "first"
    await editor.delete_workflow("t", "w", NOW)
    assert await runner.get_workflow("t", "w") is None
    assert await runner.get_workflow("t", "w", 1) is None
    # The process that made the change sees it too.
    await runner.create_workflow("t", _workflow("third"), None)
    mine = await runner.get_workflow("t", "w")
    assert mine is not None and mine.version == 3


async def test_a_process_that_stops_polling_stops_using_its_copy_before_writers_stop_waiting(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    stalled, editor = two
    await editor.create_workflow("t", _workflow("first"), None)
    assert await stalled.get_workflow("t", "w") is not None
    cache = _cache(stalled)
    assert cache._entries, "the row is kept"
    assert cache._task is not None
    cache._task.cancel()  # stalled: it neither sees changes nor renews its lease, and keeps its row
    await editor.create_workflow("t", _workflow("second"), None)
    assert cache._entries, "the stalled process still holds the old row"
    # Its lease ran out, by its own clock, before the create stopped waiting for it.
    latest = await stalled.get_workflow("t", "w")
    assert latest is not None and latest.version == 2


async def test_a_read_that_began_before_a_change_is_not_kept() -> None:
    async def unused(op: object) -> None:
        raise AssertionError("no database here")

    cache = WorkflowCache("owner", unused)
    cache._valid_until = time.monotonic() + 60
    cache._drop(1)
    key = ("t", "w", 0, None)
    tag = cache.tag()
    cache._drop(2)  # a change seen while the read was under way
    cache.keep(key, b"old", tag)
    assert cache.get(key) is None
    cache.keep(key, b"new", cache.tag())
    assert cache.get(key) == b"new"
    # The counter back below a value seen (restored, or seen but never committed), then up to it
    # again for real: a read begun in between is as old as ever.
    tag = cache.tag()
    cache._drop(1)
    cache._drop(2)
    cache.keep(key, b"older", tag)
    assert cache.get(key) is None
    cache._valid_until = 0.0
    assert cache.get(key) is None, "nothing is served once the lease ran out"


async def test_a_lease_renewed_after_an_unawaited_change_drops_the_old_rows_first(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    """A process whose lease ran out is not waited for; when it renews, a change committed in
    between must be seen by the renewal itself, not only by the next poll."""
    late, editor = two
    await editor.create_workflow("t", _workflow("first"), None)
    assert await late.get_workflow("t", "w") is not None
    cache = _cache(late)
    assert cache._task is not None
    cache._task.cancel()
    # Its lease runs out, here and in the database, so the editor's create does not wait for it.
    cache._valid_until = 0.0
    await late._write(
        lambda conn: conn.execute("UPDATE workflow_cache_acks SET until_us=0 WHERE owner=?", (cache._owner,))
    )
    await editor.create_workflow("t", _workflow("second"), None)
    # The renewal races the poll: it runs with the counter it read before the create.
    await cache._acknowledge()
    assert cache.seen == _cache(editor).seen, "the renewal saw the change committed before it"
    latest = await late.get_workflow("t", "w")
    assert latest is not None and latest.version == 2


def test_what_is_kept_stays_within_its_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    async def unused(op: object) -> None:
        raise AssertionError("no database here")

    monkeypatch.setattr(workflow_cache, "MAX_BYTES", 1000)
    monkeypatch.setattr(workflow_cache, "MAX_ENTRIES", 5)
    cache = WorkflowCache("owner", unused)
    cache._valid_until = time.monotonic() + 60
    cache._drop(1)
    for n in range(4):
        cache.keep(("t", f"w{n}", 0, None), b"x" * 300, cache.tag())
    kept = [n for n in range(4) if cache.get(("t", f"w{n}", 0, None)) is not None]
    assert kept == [1, 2, 3], "the least recently used goes first once the bytes run over"
    cache.keep(("t", "w3", 0, None), b"y" * 100, cache.tag())  # replaced: its old bytes no longer count
    for n in range(4, 7):
        cache.keep(("t", f"w{n}", 0, None), b"z" * 10, cache.tag())
    assert len(cache._entries) == 5 and cache._bytes == sum(len(b) for b in cache._entries.values()) <= 1000
    cache.keep(("t", "big", 0, None), b"b" * (workflow_cache.MAX_BODY + 1), cache.tag())
    assert cache.get(("t", "big", 0, None)) is None, "a body over MAX_BODY is read each time"


async def test_a_write_of_an_earlier_release_raises_the_counter_and_is_seen_within_a_poll(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    """While a deployment is rolled, processes of the earlier release write workflows without
    knowing of the cache: the trigger raises the counter for them."""
    runner, editor = two
    await editor.create_workflow("t", _workflow("first"), None)
    assert await runner.get_workflow("t", "w") is not None
    before = _cache(runner).seen
    newer = _workflow("second")
    newer.version = 2
    await editor._write(
        lambda conn: conn.execute(
            "INSERT INTO workflows (tenant, workflow_id, version, session_id, create_us, deleted_us, body,"
            " session_creator) VALUES ('t', 'w', 2, '', ?, NULL, ?, '')",
            (NOW, newer.SerializeToString()),
        )
    )
    for _ in range(200):  # polled every 50 ms
        if _cache(runner).seen > before:
            break
        await asyncio.sleep(0.05)
    latest = await runner.get_workflow("t", "w")
    assert latest is not None and latest.description == "second"
    await editor._write(lambda conn: conn.execute("UPDATE workflows SET deleted_us=? WHERE tenant='t'", (NOW,)))
    seen = _cache(runner).seen
    for _ in range(200):
        if _cache(runner).seen > seen:
            break
        await asyncio.sleep(0.05)
    assert await runner.get_workflow("t", "w") is None


async def test_a_counter_below_what_was_seen_drops_everything(two: tuple[PostgresStore, PostgresStore]) -> None:
    """A value seen but never committed (or a database restored from a backup) must not make the
    process take the next real change for one it has already seen."""
    runner, editor = two
    await editor.create_workflow("t", _workflow("first"), None)
    assert await runner.get_workflow("t", "w") is not None
    cache = _cache(runner)
    actual = cache.seen
    cache._drop(actual + 5)  # as if a change of a rolled-back batch had been seen
    cache.keep(("t", "w", 0, None), b"phantom", cache.tag())
    await cache._poll()
    assert cache.seen == actual and not cache._entries
    latest = await runner.get_workflow("t", "w")
    assert latest is not None and latest.description == "first"


async def test_a_poll_that_read_the_counter_before_a_change_of_its_own_does_not_undo_it() -> None:
    """The poll's read and this process's own change overlap: the poll's older value must not
    set `seen` back, or a read begun before the change would be kept under it."""
    read_started = asyncio.Event()
    release = asyncio.Event()

    async def run(op: object) -> list[tuple[int, str | None]]:
        read_started.set()
        await release.wait()
        return [(1, None)]  # the counter as read before the change, no tenant changed since

    cache = WorkflowCache("owner", run)
    cache._valid_until = time.monotonic() + 60
    cache._drop(1)
    key = ("t", "w", 0, None)
    tag = cache.tag()  # a read of the old row begins
    polling = asyncio.create_task(cache._poll())
    await read_started.wait()
    cache._drop(2, frozenset({"t"}))  # this process's own change 2, of tenant t, caught up
    release.set()
    await polling
    assert cache.seen == 2
    cache.keep(key, b"old", tag)
    assert cache.get(key) is None


async def test_a_change_of_one_tenant_leaves_the_others_rows_kept(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    """One tenant changing its workflows in a loop must not make every process re-read every
    other tenant's workflows."""
    runner, editor = two
    await editor.create_workflow("quiet", _workflow("kept"), None)
    await editor.create_workflow("busy", _workflow("first"), None)
    assert await runner.get_workflow("quiet", "w") is not None
    assert await runner.get_workflow("busy", "w") is not None
    cache = _cache(runner)
    for n in range(3):  # through the other process, and through this one
        await (editor if n % 2 == 0 else runner).create_workflow("busy", _workflow(f"change {n}"), None)
        latest = await runner.get_workflow("busy", "w")
        assert latest is not None and latest.description == f"change {n}", "the changed tenant is read anew"
    await editor.delete_workflow("busy", "w", NOW)
    assert await runner.get_workflow("busy", "w") is None
    hits, misses = cache.hits, cache.misses
    quiet = await runner.get_workflow("quiet", "w")
    assert quiet is not None and quiet.description == "kept"
    assert (cache.hits, cache.misses) == (hits + 1, misses), "the quiet tenant's row was kept all along"
    # The database says which tenant changed, whichever process (or release) wrote it.
    rows = await editor._read(lambda conn: conn.execute("SELECT tenant, seq FROM workflow_tenant_changes").fetchall())
    assert {tenant for tenant, _ in rows} == {"quiet", "busy"}
    (counter,) = await editor._read(lambda conn: conn.execute("SELECT seq FROM workflow_changes").fetchone())
    assert max(seq for _, seq in rows) == counter


async def test_too_many_tenants_changed_at_once_drop_everything(
    two: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, editor = two
    monkeypatch.setattr(workflow_cache, "MAX_TENANTS", 2)
    await editor.create_workflow("quiet", _workflow("kept"), None)
    assert await runner.get_workflow("quiet", "w") is not None
    cache = _cache(runner)
    assert cache._task is not None
    cache._task.cancel()  # polled by hand below
    await runner._write(
        lambda conn: conn.execute("UPDATE workflow_cache_acks SET until_us=0 WHERE owner=?", (cache._owner,))
    )
    for tenant in ("a", "b"):
        await editor.create_workflow(tenant, _workflow("x"), None)
    assert ("quiet", "w", 0, None) in cache._entries
    await cache._poll()  # two tenants changed: within the bound, dropped one by one
    assert ("quiet", "w", 0, None) in cache._entries
    for tenant in ("c", "d", "e"):
        await editor.create_workflow(tenant, _workflow("x"), None)
    await cache._poll()  # three: past it, everything goes
    assert not cache._entries and cache.seen == _cache(editor).seen


def test_a_drop_of_one_tenant_refuses_only_its_reads_begun_before() -> None:
    async def unused(op: object) -> None:
        raise AssertionError("no database here")

    cache = WorkflowCache("owner", unused)
    cache._valid_until = time.monotonic() + 60
    cache._drop(1)
    mine, other = ("a", "w", 0, None), ("b", "w", 0, None)
    cache.keep(other, b"b1", cache.tag())
    tag = cache.tag()  # reads of both tenants begin
    cache._drop(2, frozenset({"a"}))
    cache.keep(mine, b"a-old", tag)
    cache.keep(("b", "v", 0, None), b"b2", tag)
    assert cache.get(mine) is None, "a read begun before its tenant's drop is not kept"
    assert cache.get(("b", "v", 0, None)) == b"b2" and cache.get(other) == b"b1"
    cache.keep(mine, b"a-new", cache.tag())
    assert cache.get(mine) == b"a-new"
    cache._drop(3, frozenset({"b"}))
    assert cache.get(other) is None and cache.get(mine) == b"a-new"
    assert cache._bytes == len(b"a-new") and set(cache._by_tenant) == {"a"}
    # Past MAX_TENANT_MARKS tenants remembered, everything is dropped and they are forgotten.
    many = frozenset(f"t{n}" for n in range(workflow_cache.MAX_TENANT_MARKS))
    cache._drop(4, many)
    assert not cache._entries and not cache._tenant_dropped and cache.seen == 4
