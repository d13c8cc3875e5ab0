"""One tenant's HTTP nodes hold at most its share of the connection pool every tenant shares."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.http import HTTPRequestNode
from flowport.server.tenant_shares import TenantShares

pytestmark = pytest.mark.timeout(60)
LOOPBACK = frozenset({"127.0.0.1"})


async def test_a_tenant_holds_at_most_its_share_and_waiters_go_in_turn() -> None:
    shares = TenantShares(2)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(tenant: str, name: str) -> None:
        async with shares.slot(tenant):
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(hold("a", f"a{n}")) for n in range(4)]
    tasks.append(asyncio.create_task(hold("b", "b0")))
    await asyncio.sleep(0.05)
    assert order == ["a0", "a1", "b0"]  # a's third and fourth wait; b has its own places
    assert (shares.held("a"), shares.held("b")) == (2, 1)
    # A waiter that gives up takes no place with it.
    tasks[2].cancel()
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["a0", "a1", "b0", "a3"]
    assert (shares.held("a"), shares.held("b")) == (0, 0)
    assert not shares._held and not shares._waiting, "nothing is kept for a tenant that holds nothing"


async def test_one_tenants_hanging_requests_leave_the_pool_to_another() -> None:
    hanging = asyncio.Event()
    arrived: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ")[1].decode()
        arrived.append(path)
        if path == "/hang":
            await hanging.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # A pool of 3 connections, of which one tenant may hold 2: as 256 and its share in a server.
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=3), trust_env=False) as client:
        services = NodeServices(http=client, http_allowlist=LOOPBACK, http_shares=TenantShares(2))

        async def call(tenant: str, path: str, timeout: float = 30.0) -> dict[str, Any]:
            ctx = NodeContext(tenant, "exe", "n", 1, timeout, services)
            params = {"url": f"http://127.0.0.1:{port}{path}", "timeout": timeout, "retry_attempts": 0}
            node = HTTPRequestNode()
            return await node.run(ctx, node.prepare(params), params)

        noisy = [asyncio.create_task(call("noisy", "/hang")) for _ in range(4)]
        for _ in range(500):
            if len(arrived) == 2:
                break
            await asyncio.sleep(0.02)
        assert arrived == ["/hang", "/hang"], "noisy's two places are taken"
        # Another tenant's request gets a connection at once (without the share, noisy's would hold all 3).
        quiet = await asyncio.wait_for(call("quiet", "/fast"), 10)
        assert quiet["status_code"] == 200
        assert arrived.count("/hang") == 2, arrived
        # Noisy's waiting requests spend their own time: one that cannot get a place in time fails.
        with pytest.raises(NodeError) as late:
            await call("noisy", "/hang", timeout=1.0)
        assert late.value.reason == "HTTP_TIMEOUT"
        hanging.set()
        done = await asyncio.gather(*noisy)
        assert [d["status_code"] for d in done] == [200] * 4
    server.close()
    await server.wait_closed()
