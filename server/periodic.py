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
# Seconds a step must work without failing before its outage is said to be over. A database that
# comes back is reached again one connection at a time (one that failed to connect is tried again a
# second later), so for a moment calls work and fail by turns: that is the end of one outage, not
# several.
SETTLES = 3.0


class Failures:
    """How a repeated step reports failing: the first failure with its traceback, a line a
    minute while it goes on, and a line once the step has worked for SETTLES seconds without
    failing. A failure within those seconds goes on with the same outage (no new traceback).

    The end is said by the first call (`failed` or `worked`) made once those seconds have passed,
    or, when none comes, by a timer on the running loop that the last call that worked sets;
    `close` cancels it (an outage ending as its user stops is then not said to be over)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._since: float | None = None  # the outage's first failure; None: none going on
        self._failed_at = 0.0  # its latest failure
        self._back_at: float | None = None  # the first call that worked since then
        self._said = 0.0
        self._check: asyncio.TimerHandle | None = None
        self._check_loop: asyncio.AbstractEventLoop | None = None
        self.count = 0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._settled(now):
            self._over()  # it had worked for SETTLES: that outage ended, and this is a new one
        self._cancel()
        self._failed_at, self._back_at = now, None
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
        if self._since is None:
            return
        now = time.monotonic()
        if self._back_at is None:
            self._back_at = now
        if self._settled(now):
            self._over()
        else:
            self._check_later(self._failed_at + SETTLES - now)

    def close(self) -> None:
        """Cancel the pending check, if any: for a user that stops (its loop may be closing)."""
        self._cancel()

    def _settled(self, now: float) -> bool:
        return self._since is not None and self._back_at is not None and now - self._failed_at >= SETTLES

    def _over(self) -> None:
        assert self._since is not None and self._back_at is not None
        # How long it failed: until the first call that worked for good.
        self._log.warning("%s works again after %.0fs", self._what, self._back_at - self._since)
        self._since = self._back_at = None
        self.count = 0
        self._cancel()

    def _check_later(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside a loop: the next call says it
        if self._check is not None and self._check_loop is loop:
            return  # due as the latest failure turns SETTLES old (a failure cancels it)
        self._check = loop.call_later(max(delay, 0.0), self._checked)
        self._check_loop = loop

    def _checked(self) -> None:
        self._check = self._check_loop = None
        if self._since is None or self._back_at is None:
            return
        now = time.monotonic()
        if self._settled(now):
            self._over()
        else:
            self._check_later(self._failed_at + SETTLES - now)

    def _cancel(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = self._check_loop = None


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
        try:
            while True:
                try:
                    await self._step()
                except Exception as exc:  # noqa: BLE001 - said by `failures`; the schedule goes on
                    failures.failed(exc)
                else:
                    failures.worked()
                await asyncio.sleep(self._interval)
        finally:
            failures.close()
