"""`/ws` through a real Envoy and server while one address floods it with made-up keys: the server
answers those handshakes more and more slowly (the brute-force stall), and the stalled ones must not
hold the places every other client's handshake waits in. A valid client from another address
connects while the flood is still waiting for its answers."""

from __future__ import annotations

import asyncio
import base64
import os
from collections import Counter
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from ..conftest import ADMIN_HEADERS, Stack, make_settings, start_up, stop_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FLOOD = 300  # handshakes with made-up keys: more than the bridge's places (256)
BATCH = 50  # sent together, BATCH_PAUSE apart: 200 a second, within Envoy's rate limits
BATCH_PAUSE = 0.25
FLOODER = "127.0.0.2"  # another loopback address: Envoy sees it apart from the valid client's 127.0.0.1


@pytest.fixture(scope="module")
def slow_logins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The stall starts after the first failure a minute from an address, and soon reaches its 5 s.
    stack = start_up(make_settings(tmp_path_factory.mktemp("ws-flood"), max_login_attempts=1))
    # Each failure is a log line: start_up's reader keeps the pipe from filling.
    try:
        yield stack
    finally:
        stop_up(stack)


async def _send(port: int, n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upgrade with a made-up key, sent from FLOODER, claiming another address in its own
    x-forwarded-for (which Envoy keeps, putting the address it saw after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(FLOODER, 0))
    nonce = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
        f"x-api-key: fpk_bad{n}.x\r\nx-forwarded-for: 203.0.113.{n % 250}\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """The HTTP status the handshake is answered with."""
    try:
        status = await asyncio.wait_for(reader.readline(), 30)
        return int(status.split()[1])
    finally:
        writer.close()


async def test_a_flood_of_bad_keys_from_one_address_leaves_room_for_a_valid_client(slow_logins: Stack) -> None:
    port = slow_logins.settings.http_port
    answers: list[asyncio.Task[int]] = []
    try:
        for first in range(0, FLOOD, BATCH):
            sent = await asyncio.gather(*(_send(port, n) for n in range(first, first + BATCH)))
            answers += [asyncio.create_task(_answer(*handshake)) for handshake in sent]
            await asyncio.sleep(BATCH_PAUSE)
        # Every bad handshake is out and most wait for their stalled 401: a valid key is let in at once.
        async with connect(
            f"ws://127.0.0.1:{port}/ws", additional_headers=ADMIN_HEADERS, open_timeout=10, proxy=None
        ) as ws:
            assert ws.response is not None and ws.response.status_code == 101
            pong = await ws.ping()
            await asyncio.wait_for(pong, 10)
        assert not all(task.done() for task in answers), "the flood was over before the valid client came"
    finally:
        answered = await asyncio.gather(*answers, return_exceptions=True)
    statuses = Counter(answered)
    # Still a bare 401 for a wrong key (slowly: the stall), or at once a 503 to try again later.
    assert set(statuses) <= {401, 503} and statuses[401] >= 1, statuses
    assert statuses.total() == FLOOD
