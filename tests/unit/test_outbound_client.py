"""The HTTP client every tenant's nodes (and the webhooks) share keeps nothing of one call for the
next: no cookie a target sets is stored, so none can grow the process or reach another call."""

from __future__ import annotations

import httpx

from flowport.server.app import outbound_client


async def test_the_shared_client_keeps_no_cookie_a_target_sets() -> None:
    sent: list[str | None] = []

    def target(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("cookie"))
        cookies = [("set-cookie", f"c{n}=v; Path=/") for n in range(50)]
        return httpx.Response(200, headers=[*cookies, ("set-cookie", "s=1; Domain=example.test")])

    client = outbound_client(4)
    client._transport = httpx.MockTransport(target)  # the pool stood in for: only the jar is tested
    try:
        for tenant in ("a", "b"):
            response = await client.send(httpx.Request("GET", f"http://example.test/{tenant}"))
            assert len(response.headers.get_list("set-cookie")) == 51, "the node still sees what was set"
        assert len(client.cookies.jar) == 0
        assert sent == [None, None]
        assert client.trust_env is False, "no proxy from the environment"
    finally:
        await client.aclose()
