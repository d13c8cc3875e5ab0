"""A step run on a schedule in a task of its own (health sweeps, metric sampling).

A step that raises is logged and tried again at the next interval: one bad
round must not stop the schedule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


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
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("%s failed; will retry", self._name)
            await asyncio.sleep(self._interval)
