"""An SDK event iterator resumes after the server restarts mid-stream, missing nothing
and repeating nothing (the event log lives in the server's SQLite file)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from flowport.clients import Client
from flowport.v1 import event_pb2, session_pb2

from ..conftest import ADMIN_KEY, ServeProcess, make_settings

pytestmark = pytest.mark.integration


def test_events_resume_across_a_server_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", stream_heartbeat=0.5)
    server = ServeProcess(settings)
    server.start()
    seen: list[str] = []
    stop = threading.Event()

    def follow() -> None:
        with Client(settings.grpc_target, api_key=ADMIN_KEY) as client:
            for event in client.events(event_pb2.StreamEventsRequest(types=["session.created"]), give_up_after=30):
                seen.append(event.session_id)
                if stop.is_set() and len(seen) >= 6:
                    return

    def create(count: int) -> list[str]:
        with Client(settings.grpc_target, api_key=ADMIN_KEY) as client:
            request = session_pb2.CreateSessionRequest(session=session_pb2.Session())
            return [client.sessions.CreateSession(request, timeout=10).session_id for _ in range(count)]

    follower = threading.Thread(target=follow, daemon=True)
    try:
        follower.start()
        time.sleep(0.5)  # the stream is open
        before = create(3)
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()  # the stream drops; the iterator keeps retrying
        server = ServeProcess(settings)  # the same port and data folder
        server.start()
        after = create(3)  # likely before the iterator is back: it must replay them
        stop.set()
        follower.join(30)
    finally:
        server.stop()
    assert not follower.is_alive(), f"the iterator did not come back: saw {seen}"
    assert seen == before + after, "every event once, in order, across the restart"
