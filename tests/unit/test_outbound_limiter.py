"""The outbound limiters (server/ratelimit/outbound*.py): every strategy keeps its
limit in every window, in this process (LocalLimiter, on a simulated clock) and
across processes (two RedisLimiter instances on a real Redis, on Redis's clock);
429 backoff grows and is capped; a Redis that is gone is an error, never a skip."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest

from flowport.server.ratelimit.outbound import (
    STRATEGIES,
    LimiterUnavailable,
    LocalLimiter,
    OutboundLimiter,
    RateLimitConfig,
)
from flowport.server.ratelimit.outbound_redis import PREFIX, RedisLimiter

from ..backends import RedisServer

EPSILON = 1e-6  # seconds: float rounding at a window's edge


# -- the property every strategy must keep -------------------------------------------


def assert_within_limit(times: Sequence[float], config: RateLimitConfig) -> None:
    """No window holds more requests than `config` allows (times are the limiter's own clock)."""
    times = sorted(times)
    window, limit = config.time_window, config.max_requests
    if config.strategy == "token_bucket":
        # Any interval [t_i, t_j] holds at most burst + rate * (t_j - t_i).
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                allowed = config.capacity + config.rate * (times[j] - start) + EPSILON
                assert j - i + 1 <= allowed, f"{j - i + 1} requests in {times[j] - start:.6f}s"
        return
    if config.strategy == "fixed_window":
        per_window = Counter(math.floor(t / window) for t in times)
        assert max(per_window.values()) <= limit, per_window
        # Across an edge, two windows' worth at most.
        limit *= 2
    for j, end in enumerate(times):
        inside = sum(1 for t in times[: j + 1] if t > end - window + EPSILON)
        assert inside <= limit, f"{inside} requests in the {window}s before {end:.6f}"


# -- LocalLimiter on a simulated clock -----------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def simulate(config: RateLimitConfig, *, clients: int = 8, duration: float = 6.0, seed: int = 7) -> list[float]:
    """Greedy clients ask, wait what they are told, ask again; the granted times."""
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not a secret
    start = clock.now
    queue = [(start + rng.uniform(0, 0.2), n) for n in range(clients)]
    granted: list[float] = []
    while queue:
        at, client = heapq.heappop(queue)
        if at > start + duration:
            continue
        clock.now = at
        decision = await limiter.decide("t1:https://api.example.com:443", config)
        assert decision.at == at
        if decision.wait == 0.0:
            granted.append(at)
            # Some clients come straight back, some think for a while.
            heapq.heappush(queue, (at + rng.choice([0.0, 0.0, rng.uniform(0, 0.3)]), client))
        else:
            assert decision.wait > 0
            heapq.heappush(queue, (at + decision.wait, client))
    return granted


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_local_limiter_keeps_every_window(strategy: str, seed: int) -> None:
    config = RateLimitConfig.from_mapping({"max_requests": 5, "time_window": 0.5, "strategy": strategy})
    granted = await simulate(config, seed=seed)
    assert_within_limit(granted, config)
    # And it is not trivially safe: greedy clients get close to the limit.
    assert len(granted) >= 0.9 * 5 * 6.0 / 0.5


async def test_token_bucket_bursts_to_burst_limit_then_keeps_the_rate() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    config = RateLimitConfig(max_requests=10, time_window=1.0, burst_limit=3)
    assert [await limiter.reserve("k", config) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await limiter.reserve("k", config) == pytest.approx(0.1)
    clock.now += 0.1
    assert await limiter.reserve("k", config) == 0.0
    # Idle for long, the bucket holds burst_limit, not more.
    clock.now += 60
    assert [await limiter.reserve("k", config) for _ in range(4)][-1] > 0
    granted = await simulate(config, duration=5.0)
    assert_within_limit(granted, config)


async def test_fixed_window_counts_per_aligned_window() -> None:
    clock = FakeClock(100.9)
    limiter = LocalLimiter(clock=clock)
    config = RateLimitConfig(max_requests=2, time_window=1.0, strategy="fixed_window")
    assert [await limiter.reserve("k", config) for _ in range(2)] == [0.0, 0.0]
    assert await limiter.reserve("k", config) == pytest.approx(0.1)
    clock.now = 101.0
    assert [await limiter.reserve("k", config) for _ in range(2)] == [0.0, 0.0]


async def test_keys_are_limited_separately() -> None:
    limiter = LocalLimiter(clock=FakeClock())
    config = RateLimitConfig(max_requests=1, time_window=10, strategy="sliding_window")
    assert await limiter.reserve("a:https://x:443", config) == 0.0
    assert await limiter.reserve("a:https://x:443", config) == pytest.approx(10)
    assert await limiter.reserve("b:https://x:443", config) == 0.0
    assert await limiter.reserve("a:https://y:443", config) == 0.0


async def test_local_backoff_grows_is_capped_and_resets() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    config = RateLimitConfig(max_requests=100, time_window=1, initial_backoff=1, backoff_factor=2, max_backoff=5)
    blocks = []
    for _ in range(5):
        blocks.append(await limiter.penalise("k", config, None))
        # Blocked for everyone (on this key) meanwhile.
        assert await limiter.reserve("k", config) == pytest.approx(blocks[-1])
        assert await limiter.reserve("other", config) == 0.0
        clock.now += blocks[-1]
    assert blocks == [1, 2, 4, 5, 5]
    await limiter.succeeded("k")
    assert await limiter.penalise("k", config, None) == 1


async def test_local_429s_in_one_block_are_one_strike() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    config = RateLimitConfig(max_requests=100, time_window=1, initial_backoff=1, backoff_factor=2, max_backoff=60)
    assert await limiter.penalise("k", config, None) == 1
    # Thirty calls sent before the block, answered 429 while it holds.
    clock.now += 0.25
    for _ in range(30):
        assert await limiter.penalise("k", config, None) == pytest.approx(0.75)
    # A longer Retry-After lengthens the block, still without a strike.
    assert await limiter.penalise("k", config, 3.0) == 3.0
    clock.now += 3.0
    assert await limiter.penalise("k", config, None) == 2


async def test_local_retry_after_wins_over_a_shorter_backoff_and_strikes_are_forgotten() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    config = RateLimitConfig(max_requests=1, time_window=1, initial_backoff=1, backoff_factor=2, max_backoff=4)
    assert await limiter.penalise("k", config, 7.5) == 7.5
    assert await limiter.reserve("k", config) == 7.5
    clock.now += 7.5
    assert await limiter.penalise("k", config, 0.5) == 2
    # Quiet for longer than max(max_backoff, time_window) after the block: a fresh start.
    clock.now += 2 + 4 + 0.01
    assert await limiter.penalise("k", config, None) == 1


async def test_local_state_that_carries_nothing_is_pruned() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(clock=clock)
    for strategy in STRATEGIES:
        config = RateLimitConfig(max_requests=2, time_window=1, strategy=strategy)  # type: ignore[arg-type]
        for n in range(50):
            await limiter.reserve(f"key{n}", config)
    await limiter.penalise("key0", RateLimitConfig(max_requests=2, time_window=1), None)
    clock.now += LocalLimiter.PRUNE_EVERY + 400
    await limiter.reserve("fresh", RateLimitConfig(max_requests=2, time_window=1))
    assert limiter._buckets.keys() == {"fresh"}
    assert not limiter._logs and not limiter._windows and not limiter._blocks and not limiter._strikes


def test_config_from_the_seed_and_its_checks() -> None:
    seed = RateLimitConfig.from_mapping(
        {
            "max_requests": 100,
            "time_window": 60.0,
            "strategy": "token_bucket",
            "burst_limit": 150,
            "backoff_factor": 1.5,
            "max_backoff": 300.0,
        }
    )
    assert (seed.capacity, seed.rate, seed.initial_backoff) == (150, 100 / 60, 1.0)
    assert RateLimitConfig(max_requests=5, time_window=1).capacity == 5
    assert RateLimitConfig.from_mapping({"max_requests": 5.0, "time_window": 1, "burst_limit": None}).max_requests == 5
    assert RateLimitConfig(max_requests=1, time_window=1, backoff_factor=10).backoff(10_000) == 300
    assert RateLimitConfig(max_requests=1, time_window=1, initial_backoff=0).backoff(10_000) == 0
    with pytest.raises(ValueError, match="max_requests"):
        RateLimitConfig(max_requests=0, time_window=1)
    with pytest.raises(ValueError, match="time_window"):
        RateLimitConfig.from_mapping({"max_requests": 1, "time_window": 0})
    with pytest.raises(ValueError, match="strategy"):
        RateLimitConfig.from_mapping({"max_requests": 1, "time_window": 1, "strategy": "leaky"})
    with pytest.raises(ValueError, match="backoff_factor"):
        RateLimitConfig.from_mapping({"max_requests": 1, "time_window": 1, "backoff_factor": 0.5})
    with pytest.raises(ValueError, match="unknown rate_limit field"):
        RateLimitConfig.from_mapping({"max_requests": 1, "time_window": 1, "burst": 3})


# -- RedisLimiter on a real Redis --------------------------------------------------


@pytest.fixture
async def limiters(redis_url: str) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter]]:
    """Two limiters on one Redis: two processes."""
    first, second = RedisLimiter(redis_url), RedisLimiter(redis_url)
    yield first, second
    await first.close()
    await second.close()


async def hammer(limiters: Sequence[OutboundLimiter], config: RateLimitConfig, *, duration: float) -> list[float]:
    """Greedy clients spread over `limiters` for `duration` seconds; the granted times (limiter's clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    granted: list[float] = []

    async def client(limiter: OutboundLimiter) -> None:
        while loop.time() < deadline:
            decision = await limiter.decide("t1:https://api.example.com:443", config)
            if decision.wait == 0.0:
                granted.append(decision.at)
            else:
                await asyncio.sleep(decision.wait)

    await asyncio.gather(*(client(limiters[n % len(limiters)]) for n in range(6)))
    return granted


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_redis_limiter_keeps_every_window_across_two_processes(
    limiters: tuple[RedisLimiter, RedisLimiter], strategy: str
) -> None:
    config = RateLimitConfig.from_mapping({"max_requests": 5, "time_window": 0.25, "strategy": strategy})
    granted = await hammer(limiters, config, duration=1.0)
    assert_within_limit(granted, config)
    assert len(granted) > config.max_requests


async def test_redis_limit_is_shared_by_two_processes(limiters: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = limiters
    for strategy in STRATEGIES:
        config = RateLimitConfig(max_requests=3, time_window=30, strategy=strategy)  # type: ignore[arg-type]
        key = f"t1:https://{strategy}.example.com:443"
        assert [await first.reserve(key, config) for _ in range(3)] == [0.0, 0.0, 0.0]
        wait = await second.reserve(key, config)
        assert 0 < wait <= 30
        # The other tenant's limit is its own.
        assert await second.reserve(f"t2:https://{strategy}.example.com:443", config) == 0.0


async def test_redis_backoff_grows_is_capped_shared_and_reset(limiters: tuple[RedisLimiter, RedisLimiter]) -> None:
    first, second = limiters
    # Blocks of half a second and more: each check below makes two Redis round trips inside one,
    # which a stall of a loaded machine must not outlast.
    config = RateLimitConfig(max_requests=100, time_window=1, initial_backoff=0.5, backoff_factor=2, max_backoff=1.25)
    key = "t1:https://api.example.com:443"
    blocks = []
    for n in range(4):
        penaliser = first if n % 2 == 0 else second
        blocks.append(await penaliser.penalise(key, config, None))
        # Both processes see the block.
        assert 0 < await second.reserve(key, config) <= blocks[-1]
        # A 429 for a call sent before the block is the same episode.
        assert await first.penalise(key, config, None) <= blocks[-1]
        await asyncio.sleep(blocks[-1] + 0.05)
    assert blocks == pytest.approx([0.5, 1.0, 1.25, 1.25], abs=1e-6)
    await second.succeeded(key)
    assert await first.penalise(key, config, None) == pytest.approx(0.5, abs=1e-6)
    await asyncio.sleep(0.55)
    # Retry-After longer than the backoff wins.
    assert await first.penalise(key, config, 3.0) == pytest.approx(3.0, abs=1e-6)
    assert 2.0 < await second.reserve(key, config) <= 3.0


async def test_redis_keys_are_prefixed_and_expire(
    limiters: tuple[RedisLimiter, RedisLimiter], redis_server: RedisServer
) -> None:
    first, _ = limiters
    for strategy in STRATEGIES:
        config = RateLimitConfig(max_requests=2, time_window=1, strategy=strategy)  # type: ignore[arg-type]
        await first.reserve("t1:https://api.example.com:443", config)
    await first.penalise("t1:https://api.example.com:443", RateLimitConfig(max_requests=2, time_window=1), None)
    keys = redis_server.command("KEYS", "*")
    assert isinstance(keys, list) and len(keys) == 5
    for name in keys:
        assert isinstance(name, bytes) and name.decode().startswith(PREFIX + "{t1:https://api.example.com:443}:")
        ttl = redis_server.command("PTTL", name)
        assert isinstance(ttl, int) and ttl > 0


async def test_redis_gone_is_a_clear_error_and_its_return_is_used(redis_server: RedisServer, redis_url: str) -> None:
    limiter = RedisLimiter(redis_url, timeout=0.5)
    config = RateLimitConfig(max_requests=5, time_window=1, strategy="sliding_window")
    try:
        assert await limiter.reserve("k", config) == 0.0
        redis_server.stop()
        with pytest.raises(LimiterUnavailable, match="Redis cannot be reached"):
            await limiter.reserve("k", config)
        with pytest.raises(LimiterUnavailable):
            await limiter.penalise("k", config, None)
        with pytest.raises(LimiterUnavailable):
            await limiter.succeeded("k")
        # A restarted Redis has lost its scripts too; they are loaded again.
        redis_server.start()
        assert await limiter.reserve("k", config) == 0.0
    finally:
        redis_server.start()
        await limiter.close()
