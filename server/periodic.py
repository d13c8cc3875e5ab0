"""A step run on a schedule in a task of its own (health sweeps, metric sampling).

A step that raises is logged and tried again at the next interval: one bad
round must not stop the schedule. A step that keeps failing (its database
down for minutes) is said once with its traceback, then once a minute, then
when it works again, not once per round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

# Seconds between the reminders that a step is still failing.
REMIND_EVERY = 60.0


class Failures:
    """How a repeated step reports failing: the first failure with its traceback, a line a
    minute while it goes on, and a line when the step works again."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._since: float | None = None
        self._said = 0.0
        self.count = 0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.count += 1
        if self._since is None:
            self._since = self._said = now
            self._log.error("%s failed; will retry", self._what, exc_info=exc)
        elif now - self._said >= REMIND_EVERY:
            self._said = now
            self._log.error(
                "%s still fails after %.0fs (%d tries, now %s); will retry",
                self._what,
                now - self._since,
                self.count,
                type(exc).__name__,
            )

    def worked(self) -> None:
        if self._since is not None:
            self._log.warning("%s works again after %.0fs", self._what, time.monotonic() - self._since)
            self._since, self.count = None, 0


class Periodic:
    """Runs `step` now and then every `interval` seconds, from `start` until `close`."""

    def __init__(self, step: Callable[[], Awaitable[Any]], interval: float, name: str) -> None:
        self._step = step
        self._interval = interval
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name=self._name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _forever(self) -> None:
        failures = Failures(log, self._name)
        while True:
            try:
                await self._step()
            except Exception as exc:  # noqa: BLE001 - said by `failures`; the schedule goes on
                failures.failed(exc)
            else:
                failures.worked()
            await asyncio.sleep(self._interval)
