"""The supervisor's restarts: a server that keeps dying right after its start
is restarted later and later (up to a cap); one that ran a while is restarted
at once again. On a simulated clock, with processes that are already dead."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from flowport.server import supervisor
from flowport.server.supervisor import MAX_RESTART_DELAY, RESTART_DELAY, STABLE_RUN, Supervisor

from ..conftest import make_settings

TICK = 0.2  # the supervisor's polling interval


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Ticking(threading.Event):
    """Supervisor.stopping whose every wait is TICK seconds of the clock; set once `until` is reached."""

    def __init__(self, clock: _Clock, until: float) -> None:
        super().__init__()
        self.clock, self.until = clock, until

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += timeout or 0.0
        return self.clock.now >= self.until


class _Process:
    """A server process that dies `lives` seconds after it started (killed by SIGKILL)."""

    def __init__(self, clock: _Clock, lives: float, pid: int) -> None:
        self.clock, self.dies_at, self.pid = clock, clock.now + lives, pid

    @property
    def returncode(self) -> int | None:
        return -9 if self.clock.now >= self.dies_at else None

    def poll(self) -> int | None:
        return self.returncode


def _run(tmp_path: Path, lives: float, seconds: float) -> tuple[list[float], list[str]]:
    """Start times of the restarts of a server that lives `lives` seconds each time, and what was said."""
    clock = _Clock()
    said: list[str] = []
    sup = Supervisor(make_settings(tmp_path), out=said.append)
    sup.clock = clock
    sup.stopping = _Ticking(clock, clock.now + seconds)
    starts: list[float] = []

    def start_server(worker: int) -> Any:
        starts.append(clock.now)
        sup.servers[worker] = cast("Any", _Process(clock, lives, 100 + len(starts)))

    first = clock.now
    sup.servers[0] = cast("Any", _Process(clock, lives, 100))
    sup._start_server = start_server  # type: ignore[method-assign]
    assert sup.wait() == 0
    return [first, *starts], said


def test_a_crash_looping_server_is_restarted_later_each_time_up_to_a_cap(tmp_path: Path) -> None:
    starts, said = _run(tmp_path, lives=0.0, seconds=300)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert gaps[0] == pytest.approx(RESTART_DELAY, abs=2 * TICK)
    assert all(later >= earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert gaps[1] == pytest.approx(2 * gaps[0], abs=2 * TICK)
    assert max(gaps) == pytest.approx(MAX_RESTART_DELAY, abs=2 * TICK)
    assert said[0] == f"flowport: the server was killed by SIGKILL; starting it again in {RESTART_DELAY:g}s"
    assert said[-1].endswith(f"starting it again in {MAX_RESTART_DELAY:g}s")


def test_a_server_that_ran_a_while_is_restarted_after_the_short_delay_every_time(tmp_path: Path) -> None:
    starts, said = _run(tmp_path, lives=STABLE_RUN + 5, seconds=10 * (STABLE_RUN + 5))
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(gaps) >= 5
    assert gaps == pytest.approx([STABLE_RUN + 5 + RESTART_DELAY] * len(gaps), abs=2 * TICK)
    assert all(line.endswith(f"starting it again in {RESTART_DELAY:g}s") for line in said), said


def test_exits_are_described_by_signal_or_code() -> None:
    assert supervisor.describe_exit(-9) == "was killed by SIGKILL"
    assert supervisor.describe_exit(3) == "exited with code 3"


def test_the_restart_delay_stays_capped_however_long_the_crash_loop() -> None:
    # A night of quick deaths (a database that stays down): 2.0 ** n overflowed past n = 1024.
    assert [supervisor.restart_delay(n) for n in (1, 2, 3)] == [RESTART_DELAY, 2 * RESTART_DELAY, 4 * RESTART_DELAY]
    assert supervisor.restart_delay(2000) == supervisor.restart_delay(10**9) == MAX_RESTART_DELAY
