"""Fixed-window counters in Redis, shared by every process that uses the same Redis.

A key per (tenant, window): INCRBY, and on first use an expiry of two
windows, in one round trip. A fixed window lets up to twice the limit
through around a window's edge; it costs one key and one round trip per
request, which is what a gateway can afford on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

PREFIX = "flowport:ratelimit:"


class RedisCounters:
    """Counts hits per key and window."""

    def __init__(self, url: str, *, timeout: float = 0.2) -> None:
        # Short timeouts: a rate-limit answer that waits on a sick Redis would
        # hold every request behind it; failing fast lets the caller decide.
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )

    async def hit(self, key: str, addend: int, window: float) -> int:
        """Add `addend` to `key`'s count in the current window; the new count. Raises on Redis errors."""
        slot = int(time.time() // window)
        name = f"{PREFIX}{key}:{slot}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incrby(name, addend)
            pipe.expire(name, max(1, int(2 * window)), nx=True)
            count, _ = await pipe.execute()
        return int(count)

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        # Bounded: Redis may be gone, and a stopping server must not wait on it.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._redis.aclose(), 3.0)
