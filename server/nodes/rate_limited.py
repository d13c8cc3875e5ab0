"""RateLimitedAPINode: an HTTPRequestNode whose calls keep to a rate limit.

The limit (the seed's `RateLimitConfig`, as the `rate_limit` object) is
per tenant and per target origin (scheme://host:port of `url`), shared by
every execution of every workflow of that tenant that calls the origin,
and by every process when flowport runs with Redis (the limiter in
`ctx.services.outbound`: server/ratelimit/outbound*.py). Nodes with
different `rate_limit` objects for the same origin share its state, each
keeping its own numbers against it.

Every attempt (the first and each retry) takes a slot. Waiting for one
sleeps at most until the node's deadline or `max_wait` (seconds in total
for the node run); when no slot comes in time the node fails with
`RATE_LIMITED` (retryable, with retry_after). A 429 blocks the origin for
the whole tenant for the backoff of `rate_limit` (`initial_backoff *
backoff_factor**n`, capped at `max_backoff`; a longer Retry-After wins),
then the attempt is retried if `retry_attempts` allow; otherwise the 429
is returned as outputs with `success: false`, as HTTPRequestNode does.
Other failures (5xx, connect errors) retry as HTTPRequestNode's do.
Redirects count against the first URL's origin.

Outputs: HTTPRequestNode's, plus `rate_limit: {waited, backoffs}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar, TypeVar

import httpx

from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError
from flowport.server.nodes.http import (
    DEADLINE_MARGIN,
    HttpCall,
    HTTPRequestNode,
    _inputs_schema,
    parse_retry_after,
    perform,
)
from flowport.server.ratelimit.outbound import (
    MAX_BLOCK,
    STRATEGIES,
    LimiterUnavailable,
    OutboundLimiter,
    RateLimitConfig,
)

log = logging.getLogger(__name__)

# Replaced by tests to record waits.
_sleep = asyncio.sleep

T = TypeVar("T")

_RATE_LIMIT_SCHEMA: JsonSchema = {
    "type": "object",
    "description": "The seed's RateLimitConfig: at most max_requests per time_window seconds, per tenant and target.",
    "properties": {
        "max_requests": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "time_window": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_BLOCK, "description": "Seconds."},
        "strategy": {
            "enum": list(STRATEGIES),
            "default": "token_bucket",
            "description": "token_bucket: bursts up to burst_limit, then the average rate; sliding_window: "
            "max_requests in any time_window; fixed_window: max_requests per aligned window.",
        },
        "burst_limit": {
            "type": ["integer", "null"],
            "minimum": 1,
            "maximum": 1_000_000,
            "description": "Token bucket size (default max_requests); the window strategies ignore it.",
        },
        "backoff_factor": {"type": "number", "minimum": 1, "default": 1.5, "description": "Growth per 429."},
        "max_backoff": {"type": "number", "minimum": 0, "maximum": MAX_BLOCK, "default": 300},
        "initial_backoff": {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_BLOCK,
            "default": 1,
            "description": "Seconds the target is left alone after a first 429.",
        },
    },
    "required": ["max_requests", "time_window"],
    "additionalProperties": False,
}

_CONFIG: JsonSchema = {
    "type": "object",
    "properties": {
        **HTTPRequestNode.config_schema["properties"],
        "rate_limit": _RATE_LIMIT_SCHEMA,
        "max_wait": {
            "type": "number",
            "minimum": 0,
            "description": "Seconds this node run may spend waiting for slots in total (default: until its timeout).",
        },
    },
    "required": ["rate_limit"],
    # A URL, or a named HTTP resource (HTTPRequestNode's rule).
    "anyOf": HTTPRequestNode.config_schema["anyOf"],
    "additionalProperties": False,
}

_OUTPUTS: JsonSchema = {
    "type": "object",
    "properties": {
        **HTTPRequestNode.outputs_schema["properties"],
        "rate_limit": {
            "type": "object",
            "properties": {
                "waited": {"type": "number", "description": "Seconds spent waiting for slots."},
                "backoffs": {"type": "integer", "description": "429 answers backed off from."},
            },
            "required": ["waited", "backoffs"],
        },
    },
}


def limit_key(tenant: str, url: str) -> str:
    """What a limit is counted on: the tenant and the URL's origin."""
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    # Tenant names hold no ':', so the first one ends the tenant.
    return f"{tenant}:{parsed.scheme}://{host}:{port}"


class _Limited:
    """One node run's way through the limiter (an http.AttemptGate)."""

    def __init__(
        self, ctx: NodeContext, limiter: OutboundLimiter, url: str, config: RateLimitConfig, max_wait: float | None
    ) -> None:
        self._ctx = ctx
        self._limiter = limiter
        self._url = url
        self._config = config
        self._max_wait = max_wait
        self._key: str | None = None
        self.waited = 0.0
        self.backoffs = 0

    @property
    def key(self) -> str:
        # Lazily: perform has checked the URL by the first attempt.
        if self._key is None:
            self._key = limit_key(self._ctx.tenant, self._url)
        return self._key

    async def admit(self, attempt: int) -> None:
        while True:
            wait = await _reachable(self._limiter.reserve(self.key, self._config))
            if wait <= 0:
                return
            left = self._ctx.remaining - DEADLINE_MARGIN
            if self._max_wait is not None:
                left = min(left, self._max_wait - self.waited)
            if wait > left:
                raise NodeError(
                    f"no request slot for {self.key.split(':', 1)[1]} within {max(0.0, left):.3g}s "
                    f"(the next is in {wait:.3g}s)",
                    reason="RATE_LIMITED",
                    retryable=True,
                    retry_after=wait,
                )
            await _sleep(wait)
            # What was asked, not measured: a sleep that returns early must not stretch max_wait.
            self.waited += wait

    async def answered(self, status: int, headers: httpx.Headers) -> float | None:
        if status == 429:
            self.backoffs += 1
            retry_after = parse_retry_after(headers.get("retry-after"))
            return await _reachable(self._limiter.penalise(self.key, self._config, retry_after))
        if status < 500:
            try:
                await self._limiter.succeeded(self.key)
            except LimiterUnavailable as exc:
                # The call went through; only the backoff's reset is lost, so the answer stands.
                log.warning("outbound limiter: cannot reset the backoff of %s: %s", self.key, exc)
        return None


async def _reachable(pending: Awaitable[T]) -> T:
    try:
        return await pending
    except LimiterUnavailable as exc:
        raise NodeError(str(exc), reason="RATE_LIMITER_UNAVAILABLE", retryable=True) from exc


class RateLimitedAPINode(HTTPRequestNode):
    """One HTTP request to `url`, within the tenant's rate limit for its origin."""

    type_name: ClassVar[str] = "RateLimitedAPINode"
    description: ClassVar[str] = (
        "Sends one HTTP request like HTTPRequestNode, keeping to a rate limit per tenant and target "
        "(token bucket, sliding or fixed window, shared across executions and processes) and backing off on 429."
    )
    config_schema: ClassVar[JsonSchema] = _CONFIG
    inputs_schema: ClassVar[JsonSchema] = _inputs_schema(_CONFIG)
    outputs_schema: ClassVar[JsonSchema] = _OUTPUTS
    # A caller's input must not lift the tenant's limit for an origin.
    config_only: ClassVar[tuple[str, ...]] = ("rate_limit", "max_wait")

    async def send(self, ctx: NodeContext, call: HttpCall, params: Mapping[str, Any]) -> dict[str, Any]:
        limiter = ctx.services.outbound
        if limiter is None:
            raise NodeError("no outbound rate limiter is configured", reason="RATE_LIMITER_UNAVAILABLE")
        given = params.get("rate_limit")
        if not isinstance(given, Mapping):
            raise NodeError("rate_limit must be an object", reason="INVALID_PARAMETER")
        try:
            config = RateLimitConfig.from_mapping(given)
        except (TypeError, ValueError) as exc:
            raise NodeError(f"rate_limit: {exc}", reason="INVALID_PARAMETER") from None
        max_wait = params.get("max_wait")
        gate = _Limited(ctx, limiter, call.url, config, None if max_wait is None else float(max_wait))
        outputs = await perform(ctx, call, gate=gate)
        return {**outputs, "rate_limit": {"waited": round(gate.waited, 6), "backoffs": gate.backoffs}}
