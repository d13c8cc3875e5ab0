"""Figures only Envoy has, read from its admin interface on this machine.

`flowport up` runs Envoy with its admin on 127.0.0.1:--admin-port; the
server asks it for the counters of the local rate limits it renders
(`*.http_local_rate_limit.rate_limited`). Without an Envoy there (`flowport
serve` alone) the answer is None, quickly: GetStats then reports zero.
"""

from __future__ import annotations

import httpx

TIMEOUT = 0.5  # seconds: GetStats must not hang on a stuck admin port
_FILTER = r"http_local_rate_limit\.rate_limited$"


async def local_rate_limited(client: httpx.AsyncClient, admin_port: int) -> int | None:
    """Requests Envoy's local rate limits refused since it started; None when no Envoy answers."""
    try:
        response = await client.get(
            f"http://127.0.0.1:{admin_port}/stats",
            params={"format": "json", "filter": _FILTER},
            timeout=TIMEOUT,
        )
        response.raise_for_status()
        stats = response.json().get("stats", [])
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return sum(int(stat.get("value", 0)) for stat in stats if isinstance(stat, dict) and "value" in stat)
