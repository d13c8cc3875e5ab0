"""EventService on an in-process server: filters, resume by after_id and by
last-event-id, OUT_OF_RANGE for an expired cursor, heartbeats, and a stalled
subscriber cut off while another keeps its pace. Most tests run on the
in-process bus and on the Redis bus (a real Redis); retention across
restarts runs on each store engine (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowport.clients import ApiError, AsyncClient
from flowport.server.api.events import requested_types
from flowport.server.app import Running, start, stop
from flowport.server.errors import InvalidArgument
from flowport.server.events import log as event_log
from flowport.server.events.bus import BusEvent, EventBus
from flowport.server.settings import Settings
from flowport.server.storage import SqliteStore, SqlStore
from flowport.server.storage.migrate import bundled
from flowport.server.storage.postgres import PostgresStore
from flowport.v1 import event_pb2, event_pb2_grpc

from ..conftest import ADMIN_KEY, ADMIN_METADATA, make_settings


@pytest.fixture(params=["memory", "redis"])
def bus_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """Settings that choose the bus: in-process, or a Redis stream."""
    return {"redis_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}


@pytest.fixture
async def running(tmp_path: object, bus_settings: dict[str, object]) -> AsyncIterator[Running]:
    settings: Settings = make_settings(
        tmp_path / "data",  # type: ignore[operator]
        stream_heartbeat=0.3,
        event_queue_size=10,
        **bus_settings,
    )
    server = await start(settings)
    yield server
    await stop(server, 1.0)


@pytest.fixture
async def events(running: Running) -> AsyncIterator[event_pb2_grpc.EventServiceStub]:
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
        yield client.events


async def published(running: Running, type_: str, tenant: str = "default", **ids: str) -> str:
    """Publish an event; its id (on the Redis bus, once Redis has ordered it)."""
    return await stamped(running.bus, lambda: running.bus.publish(type_, tenant=tenant, data={"n": 1}, **ids))


async def stamped(bus: EventBus, publish: Callable[[], object]) -> str:
    """Run `publish` (one event) and return the id the event got."""
    seen: list[BusEvent] = []
    arrived = asyncio.Event()

    def listener(event: BusEvent) -> None:  # listeners get events once they have their id
        seen.append(event)
        arrived.set()

    bus.add_listener(listener)
    try:
        publish()
        async with asyncio.timeout(10):
            await arrived.wait()
    finally:
        bus._listeners.remove(listener)
    return seen[0].id


async def take(call: object, count: int, timeout: float = 10) -> list[event_pb2.Event]:
    """The next `count` non-heartbeat events of a stream."""
    got: list[event_pb2.Event] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            event = await call.read()  # type: ignore[attr-defined]
            assert event is not grpc.aio.EOF
            if event.type != "heartbeat":
                got.append(event)
    return got


async def subscribed(running: Running, before: int) -> None:
    """Wait until a stream opened since the bus had `before` subscribers has subscribed."""
    async with asyncio.timeout(10):
        while running.bus.subscriber_count <= before:  # noqa: ASYNC110 - the count is not awaitable
            await asyncio.sleep(0.005)


async def test_filters_by_ids_types_and_tenant(running: Running, events: event_pb2_grpc.EventServiceStub) -> None:
    before = running.bus.subscriber_count
    call = events.StreamEvents(event_pb2.StreamEventsRequest(session_id="s1", types=["execution.*", "session.created"]))
    await subscribed(running, before)
    await published(running, "execution.started", session_id="s2")  # other session
    await published(running, "node.started", session_id="s1")  # other type
    await published(running, "execution.started", tenant="other", session_id="s1")  # other tenant
    wanted = [
        await published(running, "execution.started", session_id="s1"),
        await published(running, "session.created", session_id="s1"),
    ]
    got = await take(call, 2)
    assert [e.id for e in got] == wanted
    assert got[0].type == "execution.started" and got[0].tenant == "default" and dict(got[0].data) == {"n": 1.0}
    call.cancel()


async def test_resume_after_a_disconnect_misses_and_repeats_nothing(
    running: Running, events: event_pb2_grpc.EventServiceStub
) -> None:
    before = running.bus.subscriber_count
    first = events.StreamEvents(event_pb2.StreamEventsRequest(workflow_id="w"))
    await subscribed(running, before)
    ids = [await published(running, "workflow.created", workflow_id="w") for _ in range(3)]
    seen = await take(first, 2)
    first.cancel()  # disconnect having seen two of three
    ids += [await published(running, "workflow.created", workflow_id="w") for _ in range(3)]  # published while away
    resumed = events.StreamEvents(event_pb2.StreamEventsRequest(workflow_id="w", after_id=seen[-1].id))
    rest = await take(resumed, 4)
    assert [e.id for e in seen + rest] == ids
    resumed.cancel()
    # An SSE client resumes with the Last-Event-ID header instead (Envoy forwards it).
    by_header = events.StreamEvents(
        event_pb2.StreamEventsRequest(workflow_id="w"), metadata=(("last-event-id", ids[3]),)
    )
    assert [e.id for e in await take(by_header, 2)] == ids[4:]
    by_header.cancel()


async def test_a_cursor_older_than_retention_is_out_of_range(
    running: Running, events: event_pb2_grpc.EventServiceStub
) -> None:
    old = await published(running, "session.created")
    for _ in range(3):
        await published(running, "session.created")
    await running.event_log.flush()
    # Everything up to now falls out of a one-event retention window (by
    # count on the in-process bus; by age with Redis, whose ids are not
    # consecutive).
    running.event_log._retention_count = 1
    running.event_log._retention_seconds = -1.0
    await running.event_log.purge()
    call = events.StreamEvents(event_pb2.StreamEventsRequest(after_id=old))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    error = ApiError.from_rpc_error(caught.value)
    assert (error.code(), error.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_OUT_OF_RANGE")
    bad = events.StreamEvents(event_pb2.StreamEventsRequest(after_id="abc"))
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await bad.read()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_idle_streams_get_heartbeats(running: Running, events: event_pb2_grpc.EventServiceStub) -> None:
    call = events.StreamEvents(event_pb2.StreamEventsRequest())
    async with asyncio.timeout(10):
        # One as the stream opens (its headers reach the client at once), then one per idle interval.
        beats = [await call.read() for _ in range(3)]
    assert all(beat.type == "heartbeat" and beat.id == "" for beat in beats)
    call.cancel()


async def test_the_log_survives_a_restart(tmp_path: object, bus_settings: dict[str, object]) -> None:
    settings = make_settings(tmp_path / "data", **bus_settings)  # type: ignore[operator]
    first = await start(settings)
    ids = [await stamped(first.bus, lambda: first.bus.publish("session.created", tenant="default")) for _ in range(3)]
    await stop(first, 1.0)
    second = await start(settings)
    try:
        later = await stamped(second.bus, lambda: second.bus.publish("session.created", tenant="default"))
        assert int(later) > int(ids[-1]), "ids keep increasing across restarts"
        async with AsyncClient(f"127.0.0.1:{second.port}", api_key=ADMIN_KEY) as client:
            call = client.events.StreamEvents(event_pb2.StreamEventsRequest(after_id=ids[0]))
            assert [e.id for e in await take(call, 3)] == [*ids[1:], later]
            call.cancel()
    finally:
        await stop(second, 1.0)


async def test_a_stalled_subscriber_is_cut_while_another_keeps_pace(
    tmp_path: object, bus_settings: dict[str, object]
) -> None:
    # A queue that absorbs the bursts below, not a stalled reader's backlog.
    running = await start(make_settings(tmp_path / "data", event_queue_size=200, **bus_settings))  # type: ignore[operator]
    total = 3000
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as fast_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as slow_channel,
    ):
        # Plain channels with the key per call: a client interceptor may read
        # a stream ahead of its caller, and this one must really stall.
        request = event_pb2.StreamEventsRequest(types=["load.*"])
        before = running.bus.subscriber_count
        fast = event_pb2_grpc.EventServiceStub(fast_channel).StreamEvents(request, metadata=ADMIN_METADATA)
        slow = event_pb2_grpc.EventServiceStub(slow_channel).StreamEvents(request, metadata=ADMIN_METADATA)
        await subscribed(running, before + 1)  # both streams, before anything is published
        received: list[str] = []

        async def read_fast() -> None:
            while len(received) < total:
                event = await fast.read()
                if event.type != "heartbeat":
                    received.append(event.id)

        reader = asyncio.create_task(read_fast())
        # Big enough that the stalled stream's transport buffers fill long
        # before the end, so its queue has to overflow.
        padding = "x" * 8192
        stamped_events: list[BusEvent] = []
        running.bus.add_listener(stamped_events.append)  # each event once it has its id
        for i in range(total):
            running.bus.publish("load.tick", tenant="default", data={"padding": padding})
            # Publish at a pace the fast reader sustains (within its queue);
            # the stalled one is never waited for.
            while len(received) < i - 100 and not reader.done():  # noqa: ASYNC110 - polling the reader's count
                await asyncio.sleep(0.001)
        await asyncio.wait_for(reader, 60)
        published = [e.id for e in stamped_events if e.type == "load.tick"]
        assert received == published, "the fast subscriber got every event, in order"
        # The stalled one never read; now it finds it was cut, with its cursor.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(30):
                while True:
                    await slow.read()
        error = ApiError.from_rpc_error(caught.value)
        assert (error.code(), error.reason) == (grpc.StatusCode.ABORTED, "SUBSCRIBER_TOO_SLOW")
        assert int(error.metadata["last_event_id"]) < int(published[-1])
        fast.cancel()
    await stop(running, 1.0)


async def _tick(running: Running) -> str:
    """Publish one `restart.tick` event of tenant default; its id."""
    return await stamped(running.bus, lambda: running.bus.publish("restart.tick", tenant="default"))


async def _replayed(running: Running, count: int, *, after_id: str = "", last_event_id: str = "") -> list[str]:
    """The ids of the first `count` `restart.tick` events a stream resumed from a cursor gets."""
    metadata = (("last-event-id", last_event_id),) if last_event_id else ()
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
        call = client.events.StreamEvents(
            event_pb2.StreamEventsRequest(after_id=after_id, types=["restart.*"]), metadata=metadata
        )
        try:
            return [e.id for e in await take(call, count)]
        finally:
            call.cancel()


async def _out_of_range(running: Running, after_id: str) -> None:
    """A stream resumed after `after_id` is refused with CURSOR_OUT_OF_RANGE."""
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
        call = client.events.StreamEvents(event_pb2.StreamEventsRequest(after_id=after_id, types=["restart.*"]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):
                await call.read()
    error = ApiError.from_rpc_error(caught.value)
    assert (error.code(), error.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_OUT_OF_RANGE"), after_id


@pytest.mark.timeout(300)
async def test_restarts_lose_no_event_and_only_a_real_purge_is_out_of_range(settings: Settings) -> None:
    # Each start reserves a fresh block of ids, so ids jump at every restart;
    # retention (run at every start here, as the periodic sweep would) must
    # count events, not ids.
    ids: list[str] = []
    for _ in range(4):
        server = await start(settings)
        try:
            assert await server.event_log.purge() == 0
            ids += [await _tick(server) for _ in range(3)]
        finally:
            await stop(server, 1.0)
    assert int(ids[3]) - int(ids[2]) > 1, "a restart skips ahead"
    server = await start(settings)
    try:
        assert await server.event_log.purge() == 0
        assert await _replayed(server, len(ids), after_id="0") == ids
        assert await _replayed(server, len(ids) - 4, last_event_id=ids[3]) == ids[4:]
        # Retention by count drops the oldest events for real: a cursor
        # before them is out of range, one after them (even across the gap
        # of a restart) replays the rest.
        server.event_log._retention_count = len(ids) - 3
        assert await server.event_log.purge() == 3
        await _out_of_range(server, "0")
        await _out_of_range(server, ids[1])
        assert await _replayed(server, len(ids) - 3, after_id=ids[2]) == ids[3:]
        # By age: everything goes, and only the newest id is still a cursor.
        server.event_log._retention_count = 1_000_000
        assert await server.event_log.purge(now=lambda: time.time() + 8 * 86400) == len(ids) - 3
        await _out_of_range(server, ids[-2])
        later = await _tick(server)
        assert await _replayed(server, 1, after_id=ids[-1]) == [later]
    finally:
        await stop(server, 1.0)


@pytest.mark.parametrize(("kept", "purged"), [([5, 6, 1_000_001], 4), ([], 2_000_000)])
async def test_a_log_from_before_the_purge_mark_counts_below_its_oldest_event_as_purged(
    tmp_path: Path, kept: list[int], purged: int
) -> None:
    # Such a log kept no record of its purges: what streams were told before
    # (out of range below the oldest kept event; all of it when empty) holds.
    path = tmp_path / "db.sqlite"
    store = await SqliteStore.open(path, [m for m in bundled() if m.name != "event_purge_mark"])
    try:
        for _ in range(2):
            await store.reserve_event_ids(1_000_000)
        await store.append_events([BusEvent(str(i), "old.tick", time.time_ns(), "default") for i in kept])
    finally:
        await store.close()
    upgraded = await SqliteStore.open(path)
    try:
        assert await upgraded.event_bounds("default") == (purged, max(kept, default=0))
        assert await upgraded.event_bounds("another") == (purged, max(kept, default=0))
    finally:
        await upgraded.close()


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (event_pb2.StreamEventsRequest(), []),
        (event_pb2.StreamEventsRequest(types=["a.x", "b.*"]), ["a.x", "b.*"]),
        (event_pb2.StreamEventsRequest(event_types=["a.x,b.*"]), ["a.x", "b.*"]),
        (event_pb2.StreamEventsRequest(event_types=["a.x", "b.*"]), ["a.x", "b.*"]),
        (event_pb2.StreamEventsRequest(event_types=[" a.x , ,b.*,"]), ["a.x", "b.*"]),
        (event_pb2.StreamEventsRequest(types=["a.x"], event_types=["b.y,c.*"]), ["a.x", "b.y", "c.*"]),
    ],
)
def test_event_types_is_merged_with_types(request_: event_pb2.StreamEventsRequest, expected: list[str]) -> None:
    assert requested_types(request_) == expected


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (event_pb2.StreamEventsRequest(types=[f"t.{i}" for i in range(51)]), "types"),
        (event_pb2.StreamEventsRequest(event_types=[",".join(f"t.{i}" for i in range(51))]), "event_types"),
        (event_pb2.StreamEventsRequest(types=["t.a"] * 25, event_types=[",".join(["t.b"] * 26)]), "event_types"),
    ],
)
def test_at_most_50_types_in_all(request_: event_pb2.StreamEventsRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        requested_types(request_)
    assert raised.value.violations == [(field, "at most 50")]


async def test_a_tenant_past_its_open_streams_is_refused_while_another_tenant_opens_its_own(tmp_path: Path) -> None:
    from flowport.v1 import apikey_pb2

    running = await start(make_settings(tmp_path / "data", tenant_max_streams=2))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            keys = [
                (await admin.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=t)))).key
                for t in ("noisy", "quiet")
            ]
        async with (
            AsyncClient(f"127.0.0.1:{running.port}", api_key=keys[0]) as noisy,
            AsyncClient(f"127.0.0.1:{running.port}", api_key=keys[1]) as quiet,
        ):
            held = [noisy.events.StreamEvents(event_pb2.StreamEventsRequest()) for _ in range(2)]
            for call in held:
                assert (await call.read()).type == "heartbeat"
            refused = noisy.events.StreamEvents(event_pb2.StreamEventsRequest())
            with pytest.raises(ApiError) as caught:
                await refused.read()
            assert (caught.value.code(), caught.value.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TENANT_STREAM_LIMIT",
            )
            assert caught.value.retry_delay is not None
            # The cap is the tenant's: another tenant still opens its streams.
            other = quiet.events.StreamEvents(event_pb2.StreamEventsRequest())
            assert (await other.read()).type == "heartbeat"
            # A stream closed gives its place back.
            held[0].cancel()
            again = None
            for _ in range(100):
                again = noisy.events.StreamEvents(event_pb2.StreamEventsRequest())
                try:
                    assert (await again.read()).type == "heartbeat"
                    break
                except ApiError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the closed stream's place never came back")
            for call in (held[1], other, again):
                call.cancel()
    finally:
        await stop(running, 1.0)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_retention_counts_each_tenants_events_apart(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # One tenant's volume must not push another's events out of the log, nor its cursors out of range.
    store: SqlStore = (
        await PostgresStore.open(request.getfixturevalue("postgres_url"))
        if engine == "postgresql"
        else await SqliteStore.open(tmp_path / "db.sqlite")
    )
    try:
        now = time.time_ns()
        quiet = [BusEvent(str(i), "quiet.tick", now, "quiet") for i in (1, 2)]
        loud = [BusEvent(str(i), "loud.tick", now, "loud") for i in range(3, 13)]
        await store.append_events([*quiet, *loud])
        assert await store.purge_events(keep_count=4, keep_after_us=0) == 6
        assert [e.id for e in await store.read_events("quiet", after=0, limit=100)] == ["1", "2"]
        assert [e.id for e in await store.read_events("loud", after=0, limit=100)] == ["9", "10", "11", "12"]
        assert await store.event_bounds("quiet") == (0, 12)
        assert await store.event_bounds("loud") == (8, 12)
        # By age, each tenant's mark is the newest of its events that went.
        aged = [BusEvent("13", "quiet.tick", now + 10**9, "quiet")]
        await store.append_events(aged)
        assert await store.purge_events(keep_count=100, keep_after_us=now // 1000 + 1) == 6
        assert await store.event_bounds("quiet") == (2, 13)
        assert await store.event_bounds("loud") == (12, 13)
        assert await store.purge_events(keep_count=100, keep_after_us=0) == 0
        assert await store.event_bounds("loud") == (12, 13), "a mark never goes back"
    finally:
        await store.close()


async def test_a_tenants_subscribers_are_offered_its_events_only() -> None:
    """One tenant's many streams must cost other tenants' events nothing: a subscriber of a tenant
    is never even asked about another tenant's events."""
    bus = EventBus()
    asked: list[str] = []

    def accept(event: BusEvent) -> bool:
        asked.append(event.tenant)
        return True

    mine = [bus.subscribe(accept, tenant="busy") for _ in range(100)]
    every = bus.subscribe(lambda e: True)
    assert bus.subscriber_count == 101
    bus.publish("x.happened", tenant="quiet")
    assert asked == [] and (await every.next(1)) is not None
    bus.publish("x.happened", tenant="busy")
    assert asked == ["busy"] * 100 and all([(await s.next(1)) is not None for s in mine])
    for subscription in mine:
        subscription.close()
    assert bus.subscriber_count == 1 and not bus._tenant_subscribers
    ended = bus.subscribe(accept, tenant="busy", client_stream=True)
    assert bus.end_streams() == 1 and ended.ended


async def test_a_tenants_replays_share_a_budget_and_others_have_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def recorded(seconds: float) -> None:
        waits.append(round(seconds, 3))

    monkeypatch.setattr(event_log.asyncio, "sleep", recorded)
    now = [0.0]
    budget = event_log.ReplayBudget(rate=1000.0, clock=lambda: now[0])
    await budget.take("busy", 500)
    await budget.take("busy", 500)
    assert waits == [], "a second's worth at once"
    await budget.take("busy", 500)  # a second stream of the same tenant: waits its turn
    await budget.take("busy", 500)
    assert waits == [0.5, 1.0]
    await budget.take("quiet", 1000)
    assert waits == [0.5, 1.0], "another tenant's budget is its own"
    now[0] += 3.0  # time passed: the debt is paid and the bucket full again, never more
    await budget.take("busy", 1000)
    assert waits == [0.5, 1.0]


async def test_events_the_store_could_not_take_are_written_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database away for a while (PostgreSQL restarting): events published meanwhile reach
    their live streams, and the event log once the store takes writes again (they used to be
    lost, so a resume after the outage missed them)."""
    from flowport.server.events.log import EventLog
    from flowport.server.storage.group_commit import StoreUnavailable

    monkeypatch.setattr(event_log, "RETRY_UNWRITTEN", 0.01)
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    refusals = 3
    real = store.append_events_soon

    def append(events: Any, done: Any = None, *, again: bool = False) -> None:
        nonlocal refusals
        if refusals and done is not None:
            refusals -= 1
            if refusals == 2:
                # The first refused write did commit (the connection broke after its COMMIT went out):
                # written again, its events must neither fail the retry nor be there twice.
                real(events, lambda _: done(StoreUnavailable("the database connection was lost")), again=again)
                return
            asyncio.get_running_loop().call_soon(done, StoreUnavailable("cannot connect to the database"))
            return
        real(events, done, again=again)

    monkeypatch.setattr(store, "append_events_soon", append)
    log, bus = await EventLog.open(store, queue_size=10, retention_count=1000, retention_seconds=3600)
    try:
        for n in range(5):
            bus.publish("session.created", tenant="t", data={"n": n})
            await asyncio.sleep(0)
        for _ in range(200):
            rows = await store.read_events("t", after=0, limit=100)
            if len(rows) == 5:
                break
            await asyncio.sleep(0.01)
        assert [row.data["n"] for row in rows] == [0, 1, 2, 3, 4], "every event is in the log, in order"
        assert refusals == 0 and log.dropped_unwritten == 0
    finally:
        await log.close()
        await store.close()
