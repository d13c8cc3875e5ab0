"""Bounded shutdown: one close that never returns must not keep the process alive.

A SIGTERM is a promise to the orchestrator that the process ends soon. Each
teardown step gets `STEP_LIMIT` seconds and the next one runs regardless; a
`Watchdog` ends the process outright when the whole shutdown overruns, after
printing every asyncio task's stack so the stuck await can be found.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Envoy's active gRPC health checks of each server (transcoder/envoy_config.py):
# one every HEALTH_CHECK_INTERVAL, answered within HEALTH_CHECK_TIMEOUT. An
# answer of NOT_SERVING takes a server out of rotation at once; checks that
# get no answer (a timeout, a refused connection) take UNHEALTHY_THRESHOLD in
# a row, so one stall of a busy server does not turn its calls into 503s.
HEALTH_CHECK_INTERVAL = 1.0
HEALTH_CHECK_TIMEOUT = 1.0
UNHEALTHY_THRESHOLD = 3
# A draining server reports NOT_SERVING and keeps serving this long: until
# Envoy's checks have seen it (the next check may be an interval away, and
# take its timeout), with a second to spare.
DEFAULT_DRAIN = HEALTH_CHECK_INTERVAL + HEALTH_CHECK_TIMEOUT + 1.0
# Seconds one teardown step (closing a pool, a client, a background loop) may take.
STEP_LIMIT = 10.0
# Seconds past the drain and the in-flight grace the whole shutdown may take before the watchdog ends it.
SHUTDOWN_MARGIN = 15.0
# Exit status of a shutdown the watchdog cut short (distinct from start-up errors, 2).
OVERRUN_EXIT = 70


def bounded(
    name: str, close: Callable[..., object], *args: object, limit: float = STEP_LIMIT
) -> Callable[[], Awaitable[None]]:
    """`close(*args)` (sync or async) as a teardown step that takes at most
    `limit` seconds and never raises: a failure is logged with `name`. A sync
    close runs on the loop and is not cut short: pass one that may block as
    `asyncio.to_thread, close`."""

    async def step() -> None:
        try:
            async with asyncio.timeout(limit):
                result = close(*args)
                if inspect.isawaitable(result):
                    await result
        except TimeoutError:
            log.error("shutdown: %s did not close within %.0fs; going on without it", name, limit)
        except Exception:
            log.exception("shutdown: closing %s failed; going on", name)

    return step


class Watchdog:
    """Ends the process if it has not exited `limit` seconds after `arm`."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        # A daemon thread: a normal exit does not wait for it.
        threading.Thread(target=self._watch, args=(loop,), name="shutdown watchdog", daemon=True).start()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        time.sleep(self.limit)
        log.error("shutdown did not finish within %.0fs; exiting now (stacks follow)", self.limit)
        # The loop is usually idle, waiting on the stuck await: let it print its tasks.
        printed = threading.Event()
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            loop.call_soon_threadsafe(_print_tasks, printed)
        printed.wait(2.0)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(OVERRUN_EXIT)


def _print_tasks(printed: threading.Event) -> None:
    try:
        for task in asyncio.all_tasks():
            print(f"task {task.get_name()}:", file=sys.stderr)
            task.print_stack(limit=12, file=sys.stderr)
    finally:
        printed.set()
