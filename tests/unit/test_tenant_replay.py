"""Resuming streams with the Redis bus, against a real Redis and a real SQLite log: a replay reads its
tenant's own events only (the tenant's Redis stream and the log), and each event once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from flowport.server.events.bus import BusEvent
from flowport.server.events.log import EventLog
from flowport.server.events.redis_bus import TENANT_STREAM, TENANT_WINDOW_MS, RedisBus
from flowport.server.storage import SqliteStore

from ..backends import RedisServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def logged(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[EventLog, RedisBus]]:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    log, bus = await EventLog.open(
        store, queue_size=10_000, retention_count=100_000, retention_seconds=3600, redis_url=redis_url
    )
    try:
        yield log, bus  # type: ignore[misc]
    finally:
        await log.close()
        await store.close()


def _counting_reads(bus: RedisBus) -> list[bytes]:
    """The stream keys of every entry the bus's XRANGE calls return, from now on."""
    read: list[bytes] = []
    xrange = bus._redis.xrange

    async def counted(name: Any, *args: Any, **kwargs: Any) -> Any:
        entries = await xrange(name, *args, **kwargs)
        read.extend(name.encode() if isinstance(name, str) else name for _ in entries)
        return entries

    bus._redis.xrange = counted
    return read


async def _caught_up(bus: RedisBus, published: list[BusEvent]) -> None:
    """Until the bus's reader has delivered what was published (so `last_id` covers it)."""
    for _ in range(200):
        if published and all(e.id for e in published) and bus.last_id >= max(int(e.id) for e in published):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the bus never caught up")


async def test_a_replay_reads_none_of_another_tenants_events(logged: tuple[EventLog, RedisBus]) -> None:
    log, bus = logged
    stamped: list[BusEvent] = []
    bus.add_listener(stamped.append)
    for n in range(1200):  # more than two of the Redis reads' pages
        bus.publish("x.happened", tenant="busy", data={"n": n})
    for n in range(3):
        bus.publish("x.happened", tenant="quiet", data={"n": n})
    await _caught_up(bus, stamped)
    read = _counting_reads(bus)

    replayed = [e async for e in log.history("quiet", 0, session_id="", workflow_id="", execution_id="")]

    assert [e.data for e in replayed] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert read and set(read) == {(TENANT_STREAM + "quiet").encode()}, "only the tenant's own stream is read"
    assert len(read) <= 3


async def test_unlogged_events_of_other_processes_come_from_redis_and_each_event_once(
    logged: tuple[EventLog, RedisBus], redis_url: str, redis_server: RedisServer
) -> None:
    log, bus = logged
    other = RedisBus(redis_url)  # another process, whose log writes have not happened yet
    await other.start()
    try:
        mine: list[BusEvent] = []
        bus.add_listener(mine.append)
        theirs: list[BusEvent] = []
        other.add_listener(theirs.append)
        for n in range(3):
            bus.publish("x.happened", tenant="t", data={"n": n})
        await _caught_up(bus, mine)
        for n in range(3, 5):
            other.publish("x.happened", tenant="t", data={"n": n})
        await _caught_up(other, theirs)
        await _caught_up(bus, theirs)
        await log.flush()

        replayed = [e async for e in log.history("t", 0, session_id="", workflow_id="", execution_id="")]
        assert [e.data for e in replayed] == [{"n": n} for n in range(5)], "logged and unlogged, each once, in order"
        ids = [int(e.id) for e in replayed]
        assert ids == sorted(ids) and len(set(ids)) == 5
        after_two = [e async for e in log.history("t", ids[1], session_id="", workflow_id="", execution_id="")]
        assert [int(e.id) for e in after_two] == ids[2:]

        # Once the tenant's stream has let them go (its window passed), logged events come from the log.
        ttl = int(redis_server.command("PTTL", TENANT_STREAM + "t"))
        assert 0 < ttl <= 2 * TENANT_WINDOW_MS, "an idle tenant's stream goes by itself"
        redis_server.command("DEL", TENANT_STREAM + "t")
        replayed = [e async for e in log.history("t", 0, session_id="", workflow_id="", execution_id="")]
        assert [e.data for e in replayed] == [{"n": n} for n in range(3)]
    finally:
        await other.close()
