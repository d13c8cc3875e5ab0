"""The server's purge round on a real SQLite file: ended executions past retention go, a bounded
number per round, and running ones and younger ones stay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from flowport.server import app
from flowport.server.settings import Settings
from flowport.server.storage import SqliteStore
from flowport.v1.execution_pb2 import Execution

DAY = 86400 * 1_000_000
NOW = 1_700_000_000_000_000


def _execution(n: int, state: int, created: int) -> Execution:
    when = timestamp_pb2.Timestamp(seconds=created // 1_000_000)
    return Execution(execution_id=f"e{n:03}", workflow_id="w", state=state, create_time=when)


async def test_a_purge_round_removes_ended_executions_past_retention_a_bounded_number_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "EXECUTION_PURGE_BATCH", 10)
    monkeypatch.setattr(app, "EXECUTION_PURGE_BATCHES", 3)
    settings = Settings.load({"data_dir": str(tmp_path), "execution_retention_seconds": "172800"}, environ={})
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        old = [_execution(n, Execution.STATE_SUCCEEDED, NOW - 3 * DAY) for n in range(45)]
        kept = [
            _execution(100, Execution.STATE_RUNNING, NOW - 9 * DAY),
            _execution(101, Execution.STATE_FAILED, NOW - DAY),
        ]
        await asyncio.gather(*(store.insert_execution("t", e, None) for e in old + kept))
        assert await app.purge_expired_rows(store, settings, NOW) == 30  # three batches of ten, then the next round
        assert await app.purge_expired_rows(store, settings, NOW) == 15
        assert await app.purge_expired_rows(store, settings, NOW) == 0
        left = await store.list_executions("t", workflow_id="", session_id="", state=0, after=None, limit=100)
        assert sorted(e.execution_id for e in left) == ["e100", "e101"]
        # 0 keeps every execution.
        keep_all = Settings.load({"data_dir": str(tmp_path), "execution_retention_seconds": "0"}, environ={})
        assert await app.purge_expired_rows(store, keep_all, NOW + 100 * DAY) == 0
        assert await store.get_execution("t", "e101") is not None
    finally:
        await store.close()


def test_purge_rounds_walk_every_webhook_at_first_hourly_and_after_a_capped_or_failed_walk() -> None:
    walk = app.DeliveryWalk()
    minute = int(app.PURGE_INTERVAL * 1e6)
    assert walk.since() == 0, "the first round: every webhook"
    walk.walked(100 * minute, 0, capped=False)
    assert walk.since() == 99 * minute, "then the busy ones, since the last round less an interval"
    walk.walked(101 * minute, 99 * minute, capped=True)
    assert walk.since() == 0, "a webhook had more left than a round takes: every webhook next"
    # That round fails before its deliveries are looked at: the next one looks at every webhook again.
    assert walk.since() == 0
    walk.walked(103 * minute, 0, capped=False)
    seen = []
    for n in range(app.FULL_DELIVERY_WALK):
        since = walk.since()
        seen.append(since)
        walk.walked((104 + n) * minute, since, capped=False)
    assert seen[0] == 102 * minute and seen.count(0) == 1, "every webhook once every FULL_DELIVERY_WALK rounds"
    assert walk.since() == (102 + app.FULL_DELIVERY_WALK) * minute, "the last round's time less an interval"
