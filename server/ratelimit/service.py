"""Envoy's rate limit service (envoy.service.ratelimit.v3), served by flowport.

Envoy asks before forwarding each request, with the request's credential
as a descriptor (`api_key` from x-api-key, `authorization` from a bearer
token). The service turns the credential into its tenant (the same key and
token checks as the server's own, cached) and counts the tenant's requests
in Redis, so the limit holds across every Envoy and every flowport process.
A request without a valid credential is not counted here: the server
refuses it, and Envoy's local per-address limit bounds how many arrive.

When Redis cannot be reached the answer follows `rate_limit_fail_open`:
OK (the default), or the call fails UNAVAILABLE, which Envoy answers with a
503 (never a 429: the tenant is not over its limit); either way it is
counted and logged. An answer carries the time to the window's end
(`x-ratelimit-reset`), and a refusal a `retry-after` header.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from redis.exceptions import RedisError

from flowport.server.auth.keys import KeyAuthenticator
from flowport.server.auth.principal import AuthenticationFailed
from flowport.server.ratelimit import wire
from flowport.server.ratelimit.counters import RedisCounters
from flowport.server.types import Context

if TYPE_CHECKING:
    from flowport.server.observability.prometheus import Prometheus

log = logging.getLogger(__name__)
DOMAIN = "flowport"
LOG_EVERY = 10.0  # seconds between log lines about an unreachable Redis

OK = wire.OK
OVER_LIMIT = wire.OVER_LIMIT


@dataclass
class RateLimitStats:
    """Counters since the process started."""

    checked: int = 0  # requests counted against a tenant
    limited: int = 0  # answered OVER_LIMIT
    backend_failures: int = 0  # Redis could not be reached
    limited_by_tenant: Counter[str] = field(default_factory=Counter)  # OVER_LIMIT answers per tenant


class RateLimitService:
    """Per-tenant request counts in Redis, as Envoy's rate limit service."""

    def __init__(
        self,
        counters: RedisCounters,
        keys: KeyAuthenticator,
        jwt: Any | None,
        *,
        limit: int,
        window: float,
        fail_open: bool,
    ) -> None:
        self._counters = counters
        self._keys = keys
        self._jwt = jwt
        self._limit = limit
        self._window = window
        self._fail_open = fail_open
        self._logged = 0.0
        self.stats = RateLimitStats()
        # Set by the app when /metrics is on (server/observability/prometheus.py).
        self.prometheus: Prometheus | None = None

    async def ShouldRateLimit(self, request: Any, context: Context) -> Any:
        tenant = await self._tenant(request)
        if tenant is None:
            return wire.RateLimitResponse(overall_code=OK)
        # One hit per request, whatever the caller asks: a larger addend would
        # let one request use up a tenant's whole window.
        addend = 1
        try:
            count = await self._counters.hit(f"tenant:{tenant}", addend, self._window)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._unavailable(exc):
                return wire.RateLimitResponse(overall_code=OK)
            # Refused as the service failing, not as the tenant over its limit: Envoy answers 503
            # (status_on_error) saying the limits cannot be checked, and no caller waits out a
            # window it never used.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limit counters unavailable")
        self.stats.checked += 1
        remaining = max(0, self._limit - count)
        code = OK if count <= self._limit else OVER_LIMIT
        if code == OVER_LIMIT:
            self.stats.limited += 1
            self.stats.limited_by_tenant[tenant] += 1
            if self.prometheus is not None:
                self.prometheus.rate_limited.inc()
        # Fixed windows from the epoch (counters.py): this one ends at the next multiple.
        reset = self._window - time.time() % self._window
        status = wire.DescriptorStatus(code=code, limit_remaining=remaining)
        status.duration_until_reset.seconds = math.ceil(reset)
        status.current_limit.requests_per_unit = self._limit
        # x-ratelimit-limit's `w=`: a window of another length has no unit to name it by, and
        # Envoy leaves `w=` out for UNKNOWN.
        if float(self._window).is_integer():
            status.current_limit.unit = wire.UNITS.get(int(self._window), 0)
        response = wire.RateLimitResponse(overall_code=code, statuses=[status])
        if code == OVER_LIMIT:
            response.response_headers_to_add.add(key="retry-after", value=str(math.ceil(reset)))
        return response

    def method_handlers(self) -> dict[str, Any]:
        """The service's one method, for registering under `wire.SERVICE`."""
        return {
            wire.METHOD: grpc.unary_unary_rpc_method_handler(
                self.ShouldRateLimit,
                request_deserializer=wire.RateLimitRequest.FromString,
                response_serializer=wire.RateLimitResponse.SerializeToString,
            )
        }

    async def close(self) -> None:
        await self._counters.close()

    async def _tenant(self, request: Any) -> str | None:
        """The tenant of the credential in the request's descriptors; None without a valid one."""
        for descriptor in request.descriptors:
            for entry in descriptor.entries:
                try:
                    if entry.key == "api_key" and entry.value:
                        principal = await self._keys.verify(entry.value)
                        return principal.tenant
                    if entry.key == "authorization" and self._jwt is not None:
                        scheme, _, token = entry.value.partition(" ")
                        if scheme.lower() == "bearer" and token:
                            tenant: str = self._jwt.verify(token.strip()).tenant
                            return tenant
                except AuthenticationFailed:
                    return None
        return None

    def _unavailable(self, exc: BaseException) -> bool:
        """Count and (now and then) log a Redis failure; whether to let the request through."""
        self.stats.backend_failures += 1
        now = time.monotonic()
        if now - self._logged > LOG_EVERY:
            self._logged = now
            what = "letting requests through" if self._fail_open else "refusing requests"
            log.warning("rate limit counters in Redis unavailable (%s): %s", exc.__class__.__name__, what)
        return self._fail_open
