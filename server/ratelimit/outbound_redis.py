"""RedisLimiter: the outbound limits of outbound.py kept in Redis, so they hold
across every flowport process that uses the same Redis.

Each decision is one Lua script run with EVALSHA: reading and recording are
atomic however many processes ask at once, and each script reads Redis's
own clock (TIME), so the processes' clocks need not agree. Times inside
Redis are integer microseconds. Keys live under `flowport:outbound:`, with
the limit key in a hash tag (every key of one limit is in one cluster
slot), and expire once they carry nothing.

A Redis that cannot be reached raises LimiterUnavailable: the limit is
never skipped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flowport.server.ratelimit.outbound import (
    MAX_BLOCK,
    MIN_WAIT,
    Decision,
    LimiterUnavailable,
    OutboundLimiter,
    RateLimitConfig,
    strike_memory,
)

PREFIX: Final = "flowport:outbound:"
_US: Final = 1_000_000

# Every reservation script: KEYS[1] the strategy's state, KEYS[2] the block
# (blocked-until, µs); returns {wait µs (0: recorded), now µs}.
_CLOCK_AND_BLOCK = """
-- Integers as digits: Redis writes a Lua number like 1e8 as "1e+08", which PEXPIRE refuses.
local function int(x) return string.format('%d', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
if blocked > now then return {math.max(MIN_WAIT, blocked - now), now} end
"""


def _script(body: str) -> str:
    return f"local MIN_WAIT = {int(MIN_WAIT * _US)}\n{_CLOCK_AND_BLOCK}\n{body}"


# ARGV: capacity, max_requests, time_window µs. State: hash {tokens, at}.
_TOKEN_BUCKET = _script("""
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2]) / tonumber(ARGV[3])  -- tokens per µs
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = capacity
if state[1] and state[2] then
  tokens = math.min(capacity, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
end
local wait = 0
if tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
else
  wait = math.max(MIN_WAIT, math.ceil((1 - tokens) / rate))
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', int(now))
redis.call('PEXPIRE', KEYS[1], int(math.ceil((capacity - tokens) / rate / 1000) + 1000))
return {wait, now}
""")

# ARGV: max_requests, time_window µs, a unique member. State: sorted set of request times.
_SLIDING_WINDOW = _script("""
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - window))
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], int(now), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], int(math.ceil(window / 1000) + 1000))
  return {0, now}
end
-- Another config on the same key may have let more in: wait until this one's limit has room.
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {math.max(MIN_WAIT, tonumber(oldest[2]) + window - now), now}
""")

# ARGV: max_requests, time_window µs. State: hash {index, count} of the current aligned window.
_FIXED_WINDOW = _script("""
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local index = math.floor(now / window)
local finish = (index + 1) * window
local state = redis.call('HMGET', KEYS[1], 'index', 'count')
local count = 0
if state[1] and tonumber(state[1]) == index then count = tonumber(state[2]) end
if count < limit then
  redis.call('HSET', KEYS[1], 'index', int(index), 'count', int(count + 1))
  redis.call('PEXPIRE', KEYS[1], int(math.ceil((finish - now) / 1000) + 1000))
  return {0, now}
end
return {math.max(MIN_WAIT, finish - now), now}
""")

# KEYS: block, strikes. ARGV: Retry-After µs (0: none), initial_backoff µs,
# backoff_factor, max_backoff µs, strike memory µs. Returns the block in µs.
# The rules are OutboundLimiter.penalise's.
_PENALISE = """
local function int(x) return string.format('%d', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local asked = tonumber(ARGV[1])
local blocked = tonumber(redis.call('GET', KEYS[1]) or '0')
local finish
if blocked > now then
  finish = math.max(blocked, now + asked)
else
  local n = tonumber(redis.call('GET', KEYS[2]) or '0')
  local grown = tonumber(ARGV[2]) * tonumber(ARGV[3]) ^ n
  if grown ~= grown then grown = 0 end  -- 0 * inf
  finish = now + math.ceil(math.max(asked, math.min(tonumber(ARGV[4]), grown)))
  redis.call('SET', KEYS[2], int(n + 1), 'PX', int(math.ceil((finish - now + tonumber(ARGV[5])) / 1000) + 1))
end
if finish > now then
  redis.call('SET', KEYS[1], int(finish), 'PX', int(math.ceil((finish - now) / 1000)))
end
return finish - now
"""


class RedisLimiter(OutboundLimiter):
    """The limits in Redis, shared by every process that uses it."""

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        # Bounded: a node waiting on a sick Redis fails (retryably) instead of hanging.
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._scripts = {
            "token_bucket": self._redis.register_script(_TOKEN_BUCKET),
            "sliding_window": self._redis.register_script(_SLIDING_WINDOW),
            "fixed_window": self._redis.register_script(_FIXED_WINDOW),
        }
        self._penalise = self._redis.register_script(_PENALISE)

    @staticmethod
    def _key(key: str, part: str) -> str:
        return f"{PREFIX}{{{key}}}:{part}"

    async def decide(self, key: str, config: RateLimitConfig) -> Decision:
        window = max(1, round(config.time_window * _US))
        args: list[int | str]
        if config.strategy == "token_bucket":
            args = [config.capacity, config.max_requests, window]
        elif config.strategy == "sliding_window":
            args = [config.max_requests, window, secrets.token_hex(8)]
        else:
            args = [config.max_requests, window]
        keys = [self._key(key, config.strategy), self._key(key, "blocked")]
        wait, now = await self._call(self._scripts[config.strategy], keys, args)
        return Decision(int(wait) / _US, int(now) / _US)

    async def penalise(self, key: str, config: RateLimitConfig, retry_after: float | None) -> float:
        args = [
            math.ceil(min(MAX_BLOCK, retry_after or 0.0) * _US),
            round(config.initial_backoff * _US),
            repr(config.backoff_factor),
            round(min(config.max_backoff, MAX_BLOCK) * _US),
            round(strike_memory(config) * _US),
        ]
        block = await self._call(self._penalise, [self._key(key, "blocked"), self._key(key, "strikes")], args)
        return int(block) / _US

    async def succeeded(self, key: str) -> None:
        await self._run(self._redis.delete(self._key(key, "strikes")))

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._run(script(keys=keys, args=args))

    @staticmethod
    async def _run(pending: Any) -> Any:
        try:
            return await pending
        except (RedisError, OSError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise LimiterUnavailable(f"the outbound rate limiter's Redis cannot be reached: {detail}") from exc

    async def close(self) -> None:
        # Bounded: Redis may be gone, and a stopping server must not wait on it.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._redis.aclose(), 3.0)
