"""The execution work queue against a real Redis: two queues stand for two processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from flowport.server.app import start, stop
from flowport.server.engine import redis_work_queue
from flowport.server.engine.redis_work_queue import STREAM, RedisWorkQueue
from flowport.server.engine.work_queue import QUEUE_FAILURES

from ..backends import RedisServer
from ..conftest import make_settings


@pytest.fixture
async def queues(redis_url: str) -> AsyncIterator[tuple[RedisWorkQueue, RedisWorkQueue]]:
    first = RedisWorkQueue(redis_url, "process-a", block_ms=200)
    second = RedisWorkQueue(redis_url, "process-b", block_ms=200)
    yield first, second
    await first.close()
    await second.close()


async def test_each_entry_goes_to_one_process_and_leaves_once_done(
    queues: tuple[RedisWorkQueue, RedisWorkQueue],
) -> None:
    a, b = queues
    for n in range(6):
        await a.submit("tenant-1", f"exe_{n}")
    assert await a.backlog() == 6
    first = await a.take(4)
    second = await b.take(4)
    taken = [e.execution_id for e in first + second]
    assert sorted(taken) == [f"exe_{n}" for n in range(6)], "every entry once, none twice"
    assert len(first) == 4 and len(second) == 2, "count bounds what a process takes"
    assert {e.tenant for e in first + second} == {"tenant-1"}
    await a.done(first)
    await b.done(second)
    assert await a.backlog() == 0
    assert await b.take(1) == [], "an empty queue returns nothing after the block"


async def test_entries_a_dead_process_read_but_never_claimed_are_taken_over(
    queues: tuple[RedisWorkQueue, RedisWorkQueue],
) -> None:
    a, b = queues
    await a.submit("t", "exe_orphan")
    read = await a.take(1)  # process A reads it, then dies before acknowledging
    assert [e.execution_id for e in read] == ["exe_orphan"]
    assert await b.reclaim(idle_ms=60_000) == [], "not before the lease"
    await asyncio.sleep(0.25)
    reclaimed = await b.reclaim(idle_ms=200)
    assert [e.execution_id for e in reclaimed] == ["exe_orphan"]
    await b.done(reclaimed)
    assert await b.reclaim(idle_ms=0) == [] and await a.backlog() == 0


async def test_entries_added_before_any_process_reads_are_delivered(redis_url: str) -> None:
    early = RedisWorkQueue(redis_url, "early")
    await early.submit("t", "exe_before_group")  # no consumer group exists yet
    late = RedisWorkQueue(redis_url, "late", block_ms=100)
    try:
        assert [e.execution_id for e in await late.take(5)] == ["exe_before_group"]
    finally:
        await early.close()
        await late.close()


async def test_a_redis_that_lost_its_data_gets_the_group_made_again(redis_url: str) -> None:
    queue = RedisWorkQueue(redis_url, "p", block_ms=100)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await queue.submit("t", "exe_1")
        await queue.done(await queue.take(1))
        await admin.flushall()  # as a Redis restarted without persistence
        with pytest.raises(QUEUE_FAILURES, match="NOGROUP"):
            await queue.take(1)
        await queue.submit("t", "exe_2")
        assert [e.execution_id for e in await queue.take(1)] == ["exe_2"]
    finally:
        await queue.close()
        await admin.aclose()


async def test_a_stopped_redis_raises_a_queue_failure(redis_server: RedisServer, redis_url: str) -> None:
    queue = RedisWorkQueue(redis_url, "p", block_ms=100)
    try:
        redis_server.stop()
        with pytest.raises(QUEUE_FAILURES):
            await queue.submit("t", "exe_1")
    finally:
        redis_server.start()
        await queue.close()


async def test_entries_given_back_go_to_another_process(queues: tuple[RedisWorkQueue, RedisWorkQueue]) -> None:
    a, b = queues
    await a.submit("t", "exe_1")
    await a.submit("t", "exe_2")
    taken = await a.take(2)  # then A fills up before claiming them
    await a.give_back(taken)
    assert await a.reclaim(idle_ms=0) == [], "nothing is left pending on A"
    assert sorted(e.execution_id for e in await b.take(5)) == ["exe_1", "exe_2"]
    assert await b.backlog() == 2, "still there until B is done with them"


async def test_queued_lists_every_waiting_entry_read_or_not_across_pages(
    queues: tuple[RedisWorkQueue, RedisWorkQueue],
) -> None:
    a, b = queues
    assert await a.queued() == set(), "no stream yet: nothing waits"
    for n in range(5):
        await a.submit("t", f"exe_{n}")
    read = await a.take(2)  # read, not yet claimed: still waiting
    await b.give_back(await b.take(1))  # moved to the end while nothing is lost
    assert await a.queued(page=2) == {f"exe_{n}" for n in range(5)}
    await a.done(read)
    assert await b.queued(page=2) == {f"exe_{n}" for n in range(2, 5)}


async def test_a_stopping_process_gives_back_what_its_last_read_handed_it(
    tmp_path: Path, postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's reads wait long enough that the one seen below is still waiting when the entry
    # comes, however slow the machine.
    monkeypatch.setattr(redis_work_queue, "READ_BLOCK_MS", 10_000)
    running = await start(make_settings(tmp_path / "data", database_url=postgres_url, redis_url=redis_url))
    other = RedisWorkQueue(redis_url, "process-b", block_ms=200)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        assert running.executor.taking_queued_work
        # As in a server that has run a while, its consumer is in a blocked read (XREADGROUP) first.
        for _ in range(200):
            clients = await redis.client_list()
            if any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the consumer never began a blocked read")
        await running.executor.stop_taking()
        # Its consumer is in a blocked read, not cancelled: what that read returns it gives back.
        first_id = await redis.xadd(STREAM, {"t": "default", "x": "exe_late"})  # as `submit` adds one
        for _ in range(100):
            if not running.executor.taking_queued_work:
                break
            await asyncio.sleep(0.05)
        assert not running.executor.taking_queued_work, "the consumer did not end by itself"
        [entry] = await other.take(5)
        # Read by the stopping process and added again at the end of the queue: not left pending
        # with it (another process would reclaim such an entry only after an idle lease).
        assert entry.execution_id == "exe_late" and entry.entry_id != first_id
    finally:
        await redis.aclose()
        await other.close()
        await stop(running, 1.0)
