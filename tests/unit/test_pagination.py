"""Page tokens are not signed: one a client made up, with the right filters' fingerprint, must be
refused as a malformed token (INVALID_ARGUMENT at `page_token`), never reach the database as a
value it cannot take (an integer past 64 bits, a NUL in text) and come back as INTERNAL."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowport.clients import ApiError, AsyncClient
from flowport.server import pagination
from flowport.server.app import Running
from flowport.server.errors import InvalidArgument
from flowport.v1 import event_pb2, session_pb2

from ..conftest import ADMIN_KEY

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(st.lists(JSON, max_size=3))
def test_every_made_up_cursor_is_a_cursor_or_a_malformed_token(cursor: list[Any]) -> None:
    for read in (pagination.cursor_str, pagination.cursor_int, pagination.cursor_time_id):
        try:
            value = read(cursor)
        except InvalidArgument as exc:
            assert exc.violations == [("page_token", "malformed")]
            continue
        parts = value if isinstance(value, tuple) else (value,)
        for part in parts:
            assert isinstance(part, str | int) and not isinstance(part, bool)
            assert (0 <= part < 2**63) if isinstance(part, int) else (len(part) <= 1024 and "\x00" not in part)


def _forged(real: str, cursor: list[Any]) -> str:
    """A token with `real`'s fingerprint (the request's filters) and the cursor `cursor`."""
    data = orjson.loads(base64.urlsafe_b64decode(real + "=" * (-len(real) % 4)))
    payload = json.dumps({"c": cursor, "f": data["f"]}).encode()  # orjson stops at 64-bit integers
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


@pytest.fixture
async def client(running: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as c:
        yield c


TIME_ID_BAD = [[2**63, "ses_x"], [-1, "ses_x"], ["1", "ses_x"], [1.5, "ses_x"], [True, "ses_x"], [1, "a\x00b"]]
TIME_ID_BAD += [[1, "x" * 2000], [1], [1, "a", "b"], [None, None], [{"a": 1}, "x"]]
INT_BAD = [[2**63], [2**70], [-5], ["abc"], [1.5], [False], [[1]], [], [1, 2]]


async def test_forged_cursors_are_invalid_argument_on_lists_never_internal(client: AsyncClient) -> None:
    for _ in range(3):
        await client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="p")))
    sessions = await client.sessions.ListSessions(session_pb2.ListSessionsRequest(page_size=1))
    events = await client.events.ListRecentEvents(event_pb2.ListRecentEventsRequest(page_size=1))
    assert sessions.next_page_token and events.next_page_token, "both lists have a second page"
    calls = [(client.sessions.ListSessions, session_pb2.ListSessionsRequest, sessions.next_page_token, TIME_ID_BAD)]
    calls += [(client.events.ListRecentEvents, event_pb2.ListRecentEventsRequest, events.next_page_token, INT_BAD)]
    for method, request_type, real, bad_cursors in calls:
        for cursor in bad_cursors:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await method(request_type(page_size=1, page_token=_forged(real, cursor)))
            error = ApiError.from_rpc_error(caught.value)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (cursor, error.message)
            assert error.violations == [("page_token", "malformed")], cursor
    # The edges of what a cursor may be are answered, as pages after them.
    edge = await client.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=1, page_token=_forged(sessions.next_page_token, [2**63 - 1, "z"]))
    )
    assert len(edge.sessions) == 1
    oldest = await client.events.ListRecentEvents(
        event_pb2.ListRecentEventsRequest(page_size=1, page_token=_forged(events.next_page_token, [0]))
    )
    assert list(oldest.events) == []


async def test_recent_events_read_count_toward_the_tenants_replay_budget(
    client: AsyncClient, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a ListRecentEvents call reads are charged to its tenant's replay budget, which the
    tenant's resuming streams share (a loop of calls over a rare type read 5,000 rows each)."""
    for n in range(5):
        await client.sessions.CreateSession(
            session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id=f"u{n}"))
        )
    charged: list[tuple[str, int]] = []
    take = running.event_log.replay.take

    async def counted(tenant: str, count: int) -> None:
        charged.append((tenant, count))
        await take(tenant, count)

    monkeypatch.setattr(running.event_log.replay, "take", counted)
    await client.events.ListRecentEvents(event_pb2.ListRecentEventsRequest(types=["no.such.type"]))
    assert charged and all(tenant == "default" for tenant, _ in charged)
    assert sum(count for _, count in charged) >= 5
