"""Reads asked at the same time share one run; the store's aggregate figures use them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from flowport.server.storage.shared_reads import SharedReads
from flowport.server.storage.sqlite import SqliteStore


async def test_callers_at_once_share_one_run_and_later_ones_run_again() -> None:
    now = [0.0]
    shared = SharedReads(clock=lambda: now[0])
    runs: list[str] = []
    gate = asyncio.Event()

    def work(key: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            runs.append(key)
            await gate.wait()
            return f"answer {key}"

        return run

    waiting = [asyncio.ensure_future(shared.read(key, work(key))) for key in ("a", "a", "a", "b")]
    for _ in range(3):
        await asyncio.sleep(0)
    assert runs == ["a", "b"], "one run per key, while the callers wait"
    now[0] = 0.1  # the runs took 0.1 s
    gate.set()
    assert await asyncio.gather(*waiting) == ["answer a"] * 3 + ["answer b"]
    now[0] = 0.5
    assert await shared.read("a", work("a")) == "answer a" and runs == ["a", "b"], "kept ten times as long as it took"
    now[0] = 1.2
    assert await shared.read("a", work("a")) == "answer a" and runs == ["a", "b", "a"], "then asked again"


async def test_a_caller_asking_in_a_loop_keeps_a_reader_busy_a_tenth_of_the_time() -> None:
    now = [0.0]
    shared = SharedReads(clock=lambda: now[0])
    runs = 0

    async def scan() -> int:
        nonlocal runs
        runs += 1
        now[0] += 0.2  # a scan of 0.2 s
        return runs

    for _ in range(1000):  # back to back, each ask 10 ms after the last answer
        await shared.read("acme", scan)
        now[0] += 0.01
    busy = 0.2 * runs
    assert busy / now[0] <= 1 / (1 + 10) + 0.01, (runs, now[0])


async def test_a_quick_query_is_not_kept_so_a_caller_reads_its_own_writes() -> None:
    now = [0.0]
    shared = SharedReads(clock=lambda: now[0])
    count = 0

    async def quick() -> int:
        now[0] += 0.0002  # a small table's count
        return count

    assert await shared.read("acme", quick) == 0
    count = 1  # the caller writes, then asks again at once
    assert await shared.read("acme", quick) == 1


async def test_a_caller_that_gives_up_leaves_the_run_to_the_others() -> None:
    shared = SharedReads()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    first = asyncio.ensure_future(shared.read("k", work))
    second = asyncio.ensure_future(shared.read("k", work))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 7
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_failure_reaches_every_caller_and_the_next_ask_runs_anew() -> None:
    shared = SharedReads()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("the database went away")

    results = await asyncio.gather(*(shared.read("k", failing) for _ in range(3)), return_exceptions=True)
    assert calls == 1 and all(isinstance(r, RuntimeError) for r in results)

    async def fine() -> int:
        return 1

    assert await shared.read("k", fine) == 1


async def test_the_stores_counts_asked_at_once_are_one_query_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(tmp_path / "flowport.db")
    try:
        reads = 0
        original = store._read

        async def counted(op: Any) -> Any:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.05)  # a scan that takes a while: the others ask meanwhile
            return await original(op)

        monkeypatch.setattr(store, "_read", counted)
        by_state = await asyncio.gather(*(store.executions_by_state("acme") for _ in range(10)))
        events = await asyncio.gather(*(store.count_events("acme") for _ in range(10)))
        sessions = await asyncio.gather(*(store.count_sessions("acme", n) for n in range(10)))
        assert reads == 3
        assert by_state[0]["running"] == 0 and set(events) == {0} and set(sessions) == {0}
        await store.count_events("other")  # another tenant's figure is its own query
        assert reads == 4
    finally:
        await store.close()
