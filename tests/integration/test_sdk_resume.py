"""An SDK event iterator, reading through Envoy of a real `flowport up`, resumes after the
whole thing (server and Envoy) restarts mid-stream, missing nothing and repeating nothing
(the event log lives in the server's SQLite file)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from flowport.clients import Client
from flowport.v1 import event_pb2, session_pb2

from ..conftest import ADMIN_KEY, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration


def test_events_resume_across_a_server_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", stream_heartbeat=0.5)
    target = f"127.0.0.1:{settings.http_port}"  # Envoy
    stack = start_up(settings)
    seen: list[str] = []
    stop = threading.Event()

    def follow() -> None:
        with Client(target, api_key=ADMIN_KEY) as client:
            for event in client.events(event_pb2.StreamEventsRequest(types=["session.created"]), give_up_after=30):
                seen.append(event.session_id)
                if stop.is_set():
                    return

    def create(count: int) -> list[str]:
        with Client(target, api_key=ADMIN_KEY) as client:
            request = session_pb2.CreateSessionRequest(session=session_pb2.Session())
            return [client.sessions.CreateSession(request, timeout=10).session_id for _ in range(count)]

    def until_seen(wanted: list[str]) -> None:
        deadline = time.monotonic() + 15
        while not set(wanted) <= set(seen):
            assert time.monotonic() < deadline, f"the iterator did not see {wanted}: saw {seen}"
            time.sleep(0.05)

    follower = threading.Thread(target=follow, daemon=True)
    probes: list[str] = []
    try:
        follower.start()
        # The stream is open once it has seen one of these (it starts at the newest event).
        deadline = time.monotonic() + 15
        while not seen:
            assert time.monotonic() < deadline, "the iterator never saw an event"
            probes += create(1)
            time.sleep(0.2)
        before = create(3)
        until_seen(before)
        assert stop_up(stack) == 0  # the stream drops; the iterator keeps retrying
        stack = start_up(settings)  # the same ports and data folder
        after = create(3)  # likely before the iterator is back: it must replay them
        until_seen(after)
        stop.set()
        closer = create(1)  # the event the follower ends on
        follower.join(30)
    finally:
        stop_up(stack)
    assert not follower.is_alive(), f"the iterator did not come back: saw {seen}"
    # Every event once, in order, across the restart (after the probes it caught).
    assert seen[-7:] == before + after + closer, seen
    assert set(seen[:-7]) <= set(probes) and len(seen) == len(set(seen)), seen
