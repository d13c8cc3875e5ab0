"""Limits on the calls flowport makes to external APIs (RateLimitedAPINode).

The inbound limits (counters.py, Envoy) protect flowport from its callers;
these protect the APIs that a tenant's workflows call: one limit per key
(the node uses tenant + target origin), whichever execution makes the call.
`LocalLimiter` keeps the state in this process; `RedisLimiter`
(outbound_redis.py) keeps it in Redis, so every process sharing that Redis
shares the limit.

A limiter never sleeps. `reserve` either records the request and returns
0.0, or records nothing and returns how long to wait before asking again;
the caller decides whether it can afford that (its deadline, its max_wait).
A 429 from the target is reported with `penalise`, which blocks the key for
every caller for a backoff that grows with each consecutive 429.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, get_args

Strategy = Literal["token_bucket", "sliding_window", "fixed_window"]
STRATEGIES: Final[tuple[str, ...]] = get_args(Strategy)

# A Retry-After (or backoff) beyond a day is taken as a day: a misbehaving
# target must not block a tenant's calls to it for a year.
MAX_BLOCK: Final = 86_400.0
# The shortest wait a refusal returns: rounding at a boundary could
# otherwise say "wait 0 s" and set a caller spinning.
MIN_WAIT: Final = 0.001
# A token bucket this close to a whole token counts as having it (float
# rounding after a wait of exactly (1 - tokens) / rate).
_TOKEN_EPSILON: Final = 1e-9


@dataclass(frozen=True)
class RateLimitConfig:
    """The seed's RateLimitConfig: at most `max_requests` per `time_window` seconds.

    - `token_bucket`: a bucket of `burst_limit` tokens (default
      `max_requests`) refilled at max_requests / time_window per second: in
      any interval of t seconds at most burst_limit + rate * t requests.
    - `sliding_window`: at most `max_requests` in any interval of
      `time_window` seconds.
    - `fixed_window`: at most `max_requests` per aligned window
      (floor(t / time_window)); up to twice that can pass around a window's
      edge. Both window strategies ignore `burst_limit`.

    After a 429 the key is blocked for max(Retry-After,
    min(max_backoff, initial_backoff * backoff_factor ** n)), n being the
    consecutive 429s before this one.
    """

    max_requests: int
    time_window: float
    strategy: Strategy = "token_bucket"
    burst_limit: int | None = None
    backoff_factor: float = 1.5
    max_backoff: float = 300.0
    initial_backoff: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_requests, bool) or not isinstance(self.max_requests, int) or self.max_requests < 1:
            problems.append("max_requests must be an integer >= 1")
        if not self.time_window > 0 or not math.isfinite(self.time_window):
            problems.append("time_window must be a number > 0")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.burst_limit is not None and (
            isinstance(self.burst_limit, bool) or not isinstance(self.burst_limit, int) or self.burst_limit < 1
        ):
            problems.append("burst_limit must be an integer >= 1")
        if not self.backoff_factor >= 1:
            problems.append("backoff_factor must be >= 1")
        if not self.max_backoff >= 0:
            problems.append("max_backoff must be >= 0")
        if not self.initial_backoff >= 0:
            problems.append("initial_backoff must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RateLimitConfig:
        """From a node's `rate_limit` object (JSON numbers); raises ValueError on unknown keys or bad values."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown rate_limit field(s): {', '.join(unknown)}")
        given = {name: value for name, value in values.items() if value is not None}
        for name in ("time_window", "backoff_factor", "max_backoff", "initial_backoff"):
            if isinstance(given.get(name), int) and not isinstance(given[name], bool):
                given[name] = float(given[name])
        for name in ("max_requests", "burst_limit"):
            # JSON Schema counts 5.0 as an integer; so do we.
            value = given.get(name)
            if isinstance(value, float) and value.is_integer():
                given[name] = int(value)
        return cls(**given)

    @property
    def capacity(self) -> int:
        """Token bucket size."""
        return self.burst_limit or self.max_requests

    @property
    def rate(self) -> float:
        """Requests per second on average."""
        return self.max_requests / self.time_window

    def backoff(self, strikes: int) -> float:
        """Seconds to block after a 429 that follows `strikes` consecutive ones (before Retry-After)."""
        if self.initial_backoff == 0:
            return 0.0
        try:
            grown = self.initial_backoff * self.backoff_factor**strikes
        except OverflowError:
            grown = math.inf
        return min(self.max_backoff, grown, MAX_BLOCK)


@dataclass(frozen=True)
class Decision:
    """A limiter's answer to one request."""

    wait: float  # 0.0: recorded, go now; else seconds before asking again (nothing recorded)
    at: float  # the limiter's clock when it decided, in seconds: what its windows are measured on


class LimiterUnavailable(Exception):
    """The limiter's shared state (Redis) cannot be reached: the limit cannot be checked."""


class OutboundLimiter(ABC):
    """Shared limits on outgoing calls, by key."""

    async def reserve(self, key: str, config: RateLimitConfig) -> float:
        """Record one request and return 0.0 when it may go now; else the seconds to wait first.

        While `key` is blocked after a 429 this is the block's remaining time.
        Raises LimiterUnavailable.
        """
        return (await self.decide(key, config)).wait

    @abstractmethod
    async def decide(self, key: str, config: RateLimitConfig) -> Decision:
        """`reserve`, with the limiter's clock reading (what tests check the windows against)."""

    @abstractmethod
    async def penalise(self, key: str, config: RateLimitConfig, retry_after: float | None) -> float:
        """After a 429: block `key` for every caller; returns the seconds it stays blocked.

        The block is max(retry_after, config.backoff(n)), n being the 429s
        since the last `succeeded(key)`. A 429 that arrives while the key is
        already blocked belongs to the same episode (concurrent calls sent
        before the block): it may lengthen the block to its Retry-After but
        does not count as another strike, or 30 concurrent calls answered
        429 together would jump the backoff 30 steps. Strikes are forgotten
        after a quiet spell of max(max_backoff, time_window) past the block.
        Raises LimiterUnavailable.
        """

    @abstractmethod
    async def succeeded(self, key: str) -> None:
        """The target took a request without a 429: the backoff starts again from initial_backoff."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


def strike_memory(config: RateLimitConfig) -> float:
    """Seconds past a block's end that its strikes are remembered."""
    return max(config.max_backoff, config.time_window)


@dataclass
class _Bucket:
    tokens: float
    at: float
    until: float  # full again: carries nothing after this


@dataclass
class _Log:
    times: deque[float]
    until: float


@dataclass
class _Window:
    index: int
    count: int
    until: float


@dataclass
class _Strikes:
    count: int
    until: float


class LocalLimiter(OutboundLimiter):
    """The limits in this process: exact, for one process (no Redis configured).

    Safe for any number of tasks on one event loop: no method awaits
    between reading and updating the state, so each decision is atomic.
    """

    PRUNE_EVERY: Final = 60.0  # seconds between sweeps of state that carries nothing any more

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._logs: dict[str, _Log] = {}
        self._windows: dict[str, _Window] = {}
        self._blocks: dict[str, float] = {}  # blocked until
        self._strikes: dict[str, _Strikes] = {}
        self._next_prune = clock() + self.PRUNE_EVERY

    async def decide(self, key: str, config: RateLimitConfig) -> Decision:
        now = self._clock()
        if now >= self._next_prune:
            self._prune(now)
        blocked = self._blocks.get(key, 0.0)
        if blocked > now:
            return Decision(max(MIN_WAIT, blocked - now), now)
        if config.strategy == "token_bucket":
            wait = self._token_bucket(key, config, now)
        elif config.strategy == "sliding_window":
            wait = self._sliding_window(key, config, now)
        else:
            wait = self._fixed_window(key, config, now)
        return Decision(wait if wait == 0.0 else max(MIN_WAIT, wait), now)

    def _token_bucket(self, key: str, config: RateLimitConfig, now: float) -> float:
        capacity, rate = config.capacity, config.rate
        bucket = self._buckets.get(key)
        tokens = float(capacity) if bucket is None else min(capacity, bucket.tokens + (now - bucket.at) * rate)
        wait = 0.0
        if tokens >= 1.0 - _TOKEN_EPSILON:
            tokens = max(0.0, tokens - 1.0)
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[key] = _Bucket(tokens, now, now + (capacity - tokens) / rate)
        return wait

    def _sliding_window(self, key: str, config: RateLimitConfig, now: float) -> float:
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = _Log(deque(), now)
        horizon = now - config.time_window
        while log.times and log.times[0] <= horizon:
            log.times.popleft()
        if len(log.times) < config.max_requests:
            log.times.append(now)
            log.until = now + config.time_window
            return 0.0
        # Another config on the same key may have let more in: wait until
        # enough have left the window that this one's limit has room.
        return log.times[len(log.times) - config.max_requests] - horizon

    def _fixed_window(self, key: str, config: RateLimitConfig, now: float) -> float:
        index = math.floor(now / config.time_window)
        end = (index + 1) * config.time_window
        window = self._windows.get(key)
        count = window.count if window is not None and window.index == index else 0
        if count < config.max_requests:
            self._windows[key] = _Window(index, count + 1, end)
            return 0.0
        return end - now

    async def penalise(self, key: str, config: RateLimitConfig, retry_after: float | None) -> float:
        now = self._clock()
        asked = min(MAX_BLOCK, retry_after or 0.0)
        blocked = self._blocks.get(key, 0.0)
        if blocked > now:
            until = max(blocked, now + asked)
        else:
            strikes = self._strikes.get(key)
            n = strikes.count if strikes is not None and strikes.until > now else 0
            until = now + max(asked, config.backoff(n))
            self._strikes[key] = _Strikes(n + 1, until + strike_memory(config))
        self._blocks[key] = until
        return until - now

    async def succeeded(self, key: str) -> None:
        self._strikes.pop(key, None)

    def _prune(self, now: float) -> None:
        self._next_prune = now + self.PRUNE_EVERY
        for states in (self._buckets, self._logs, self._windows, self._strikes):
            for key in [key for key, state in states.items() if state.until <= now]:
                del states[key]
        for key in [key for key, until in self._blocks.items() if until <= now]:
            del self._blocks[key]
