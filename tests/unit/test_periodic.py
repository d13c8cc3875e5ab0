"""How a repeated step's outage is logged (server/periodic.py `Failures`): its first failure with
the traceback, a reminder at most once a minute, and one "works again" once it has worked for
SETTLES seconds without failing; calls that work and fail by turns as a database comes back (its
connections return one at a time) are one outage, not several."""

from __future__ import annotations

import asyncio
import logging

import pytest

from flowport.server import periodic
from flowport.server.periodic import Failures, Periodic

LOGGER = "tests.periodic"
SETTLES = 0.2


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(periodic, "SETTLES", SETTLES)


def said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in said(caplog)]


async def test_calls_that_work_and_fail_by_turns_are_one_outage(caplog: pytest.LogCaptureFixture) -> None:
    failures = Failures(logging.getLogger(LOGGER), "reading x")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        failures.failed(ConnectionError("refused"))
        failures.worked()  # one connection is back
        await asyncio.sleep(SETTLES / 4)
        failures.failed(ConnectionError("refused"))  # another is not yet: the same outage
        await asyncio.sleep(SETTLES / 4)
        failures.worked()
        failures.worked()
        assert lines(caplog) == ["reading x failed; will retry"]  # not over yet: it failed a moment ago
        await asyncio.sleep(SETTLES * 2)  # no call after the last one: said all the same
    assert lines(caplog) == ["reading x failed; will retry", "reading x works again after 0s"]
    assert [bool(r.exc_info) for r in said(caplog)] == [True, False]  # one traceback
    assert failures.count == 0


async def test_a_call_after_the_settle_time_says_the_end_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """A step run less often than SETTLES (lease renewals): the first call that works after them
    says so itself, and a failure that comes after them begins a new outage."""
    failures = Failures(logging.getLogger(LOGGER), "renewing y")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        failures.failed(ConnectionError("refused"))
        await asyncio.sleep(SETTLES * 1.5)
        failures.worked()
        assert lines(caplog) == ["renewing y failed; will retry", "renewing y works again after 0s"]
        failures.failed(ConnectionError("refused"))  # a new outage: its own traceback
        failures.worked()
        failures.close()  # stopping within the settle time: nothing pending, nothing said
        await asyncio.sleep(SETTLES * 1.5)
        assert len(lines(caplog)) == 3
        failures.failed(ConnectionError("refused"))  # it had worked for SETTLES: that outage ended
    assert lines(caplog) == [
        "renewing y failed; will retry",
        "renewing y works again after 0s",
        "renewing y failed; will retry",
        "renewing y works again after 0s",
        "renewing y failed; will retry",
    ]
    assert [bool(r.exc_info) for r in said(caplog)] == [True, False, True, False, True]


async def test_an_outage_that_goes_on_is_recalled_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(periodic, "REMIND_EVERY", 0.3)
    failures = Failures(logging.getLogger(LOGGER), "polling z")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(8):  # fails, and works now and then, never for SETTLES
            failures.failed(TimeoutError())
            failures.worked()
            await asyncio.sleep(0.05)
        failures.failed(TimeoutError())
        failures.close()
    got = lines(caplog)
    assert got[0] == "polling z failed; will retry"
    assert len(got) == 2 and got[1].startswith("polling z still fails after 0s (") and "TimeoutError" in got[1], got


async def test_a_stopped_schedule_leaves_no_timer(caplog: pytest.LogCaptureFixture) -> None:
    """A Periodic closed while its step's outage settles cancels the check (and says nothing)."""
    calls = 0
    worked_twice = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("refused")
        if calls == 3:
            worked_twice.set()

    schedule = Periodic(step, 0.01, LOGGER)
    with caplog.at_level(logging.INFO, logger=periodic.__name__):
        schedule.start()
        await worked_twice.wait()
        await schedule.close()  # within the settle time of the calls that worked
        await asyncio.sleep(SETTLES * 1.5)
    assert [r.getMessage() for r in caplog.records if r.name == periodic.__name__] == [f"{LOGGER} failed; will retry"]
