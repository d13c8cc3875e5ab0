"""Bounded shutdown: a teardown step that hangs or fails is logged by name
and the next one runs; a shutdown that overruns ends the process with the
stuck task's stack on stderr."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import pytest

from flowport.server.shutdown import OVERRUN_EXIT, bounded


async def test_a_step_that_never_returns_is_cut_off_and_named(caplog: pytest.LogCaptureFixture) -> None:
    never = asyncio.Event()
    closed: list[str] = []
    async with asyncio.timeout(5):  # the step's own limit is far shorter
        await bounded("the stuck pool", never.wait, limit=0.05)()
        await bounded("the next pool", closed.append, "next")()
    assert closed == ["next"]
    assert "shutdown: the stuck pool did not close within" in caplog.text


async def test_a_step_that_fails_is_logged_and_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise ConnectionError("connection reset")

    with caplog.at_level(logging.ERROR):
        await bounded("the work queue", broken)()
    assert "shutdown: closing the work queue failed" in caplog.text
    assert "ConnectionError" in caplog.text


def test_the_watchdog_ends_an_overrunning_shutdown_with_the_stuck_stack() -> None:
    script = textwrap.dedent(
        """
        import asyncio
        from flowport.server.shutdown import Watchdog

        async def wait_for_a_reply_that_never_comes() -> None:
            await asyncio.Event().wait()

        async def main() -> None:
            Watchdog(0.3).arm(asyncio.get_running_loop())
            await asyncio.create_task(wait_for_a_reply_that_never_comes(), name="stuck close")

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == OVERRUN_EXIT
    assert "shutdown did not finish within" in done.stderr
    assert "task stuck close:" in done.stderr
    assert "wait_for_a_reply_that_never_comes" in done.stderr
