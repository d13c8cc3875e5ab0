"""The Redis event bus against a real Redis: two buses stand for two processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flowport.server.events import redis_bus
from flowport.server.events.bus import BusEvent
from flowport.server.events.redis_bus import SEQUENCE, STREAM, RedisBus, event_id, stream_id

from ..backends import RedisServer


@pytest.fixture
async def buses(redis_url: str) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    first, second = RedisBus(redis_url), RedisBus(redis_url)
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


def test_ids_and_stream_ids_map_both_ways() -> None:
    assert event_id(b"1732612345678-7") == 1732612345678 * SEQUENCE + 7
    assert stream_id(event_id("1732612345678-7")) == "1732612345678-7"
    assert event_id("1732612345678-0") < event_id("1732612345678-1") < event_id("1732612345679-0")


async def test_events_reach_every_process_once_in_one_order(buses: tuple[RedisBus, RedisBus]) -> None:
    a, b = buses
    logged_a: list[BusEvent] = []
    logged_b: list[BusEvent] = []
    a.add_listener(logged_a.append)
    b.add_listener(logged_b.append)
    on_a = a.subscribe(lambda e: True)
    on_b = b.subscribe(lambda e: True)
    a.publish("session.created", tenant="t", session_id="s1")
    b.publish("session.created", tenant="t", session_id="s2")
    a.publish("session.deleted", tenant="t", session_id="s1")
    got_a = [await on_a.next(5) for _ in range(3)]
    got_b = [await on_b.next(5) for _ in range(3)]
    assert got_a == got_b  # the same events, ids and order on both
    assert all(e is not None for e in got_a)
    ids = [int(e.id) for e in got_a if e is not None]
    assert ids == sorted(ids) and len(set(ids)) == 3
    # Listeners (the event log, webhooks) run on the publishing process only.
    assert [e.session_id for e in logged_a] == ["s1", "s1"]
    assert [e.session_id for e in logged_b] == ["s2"]
    assert {e.id for e in logged_a + logged_b} == {str(i) for i in ids}
    history = [e async for e in b.history("t", ids[0], ids[-1])]
    assert [e.id for e in history] == [str(i) for i in ids[1:]]


async def test_without_redis_publishing_goes_on_locally_and_recovers(
    buses: tuple[RedisBus, RedisBus], redis_server: RedisServer
) -> None:
    a, b = buses
    logged: list[BusEvent] = []
    a.add_listener(logged.append)
    on_a = a.subscribe(lambda e: True)
    redis_server.stop()
    try:
        a.publish("session.created", tenant="t", session_id="during")
        local = await on_a.next(10)
        assert local is not None and local.session_id == "during"
        assert a.degraded
        assert [e.session_id for e in logged] == ["during"] and int(logged[0].id) > 0
    finally:
        redis_server.start()
    on_b = b.subscribe(lambda e: True)
    for _ in range(100):  # the readers reconnect
        a.publish("session.created", tenant="t", session_id="after")
        event = await on_b.next(0.2)
        if event is not None:
            break
        await asyncio.sleep(0.1)
    assert event is not None and event.session_id == "after"
    assert not a.degraded
    assert int(event.id) > int(logged[0].id), "ids keep increasing across the outage"


@pytest.mark.parametrize("redis_away_at_start", [False, True])
async def test_what_is_added_while_a_reader_waits_to_retry_reaches_it(
    redis_url: str, redis_server: RedisServer, redis_away_at_start: bool
) -> None:
    # A reader that waits to retry, or has not read yet, must read on from a fixed place: events
    # another process adds meanwhile are its subscribers' too. An empty stream is where "$" (the
    # end at the time of each read) would have skipped them.
    redis_server.command("DEL", STREAM)
    publisher, reader = RedisBus(redis_url), RedisBus(redis_url)
    await publisher.start()
    if redis_away_at_start:
        redis_server.stop()
        await reader.start()
        assert reader.degraded
        redis_server.start()
    else:
        await reader.start()
        redis_server.stop()
        redis_server.start()  # Redis was away for a moment: the reader's next try is RETRY_DELAY away
    try:
        listening = reader.subscribe(lambda e: True)
        for _ in range(50):  # until the publisher's connection is back (its first tries may fail)
            publisher.publish("session.created", tenant="t", session_id="meanwhile")
            await asyncio.sleep(0.05)
            if not publisher.degraded:
                break
        got = await listening.next(10)
        assert got is not None and got.session_id == "meanwhile"
    finally:
        await publisher.close()
        await reader.close()


async def test_events_published_during_and_right_after_a_command_share_the_next(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command costs the process far more than an event in it: events published while one is
    under way, or within SEND_DELAY after it, go out together in the next."""
    monkeypatch.setattr(redis_bus, "SEND_DELAY", 0.2)  # a window no scheduling hiccup closes
    bus = RedisBus(redis_url)
    await bus.start()
    sizes: list[int] = []
    first_returned = asyncio.Event()
    add_batch = bus._add_batch

    async def counted(*, keys: list[str], args: list[object]) -> object:
        sizes.append((len(args) - 4) // 2)  # ARGV: four settings, then each event's tenant key and body
        if len(sizes) == 1:
            bus.publish("session.created", tenant="t", session_id="during")
        ids = await add_batch(keys=keys, args=args)
        first_returned.set()
        return ids

    bus._add_batch = counted
    listening = bus.subscribe(lambda e: True)
    try:
        bus.publish("session.created", tenant="t", session_id="first")
        await asyncio.wait_for(first_returned.wait(), 10)
        bus.publish("session.created", tenant="t", session_id="after")
        got = [await listening.next(10) for _ in range(3)]
        assert [e.session_id for e in got if e is not None] == ["first", "during", "after"]
        assert sizes == [1, 2], "the event published during the first command waits for the one after it"
    finally:
        await bus.close()
