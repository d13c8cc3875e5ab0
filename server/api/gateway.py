"""GatewayService: info, health and stats of this server."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from flowport.server.api.common import now_us
from flowport.server.auth.authenticator import Authenticator
from flowport.server.engine.executor import Executor
from flowport.server.events.bus import EventBus
from flowport.server.events.redis_bus import RedisBus
from flowport.server.health import Check, overall, run_check
from flowport.server.metrics import RequestMetrics
from flowport.server.nodes.base import NodeServices
from flowport.server.ratelimit.service import RateLimitService
from flowport.server.registry.health import HealthChecker
from flowport.server.resources.health import PoolHealth
from flowport.server.storage import Store
from flowport.server.types import Context
from flowport.server.version import VERSION
from flowport.server.webhooks.dispatcher import WebhookDispatcher
from flowport.v1 import gateway_pb2, gateway_pb2_grpc

CHECK_TIMEOUT = 2.0

# (name, served now, why not). UNFINISHED: flipped on as their issues land.
FEATURES = [
    ("sessions", True, ""),
    ("health", True, ""),
    ("stats", True, ""),
    ("workflows", True, ""),
    ("executions", True, ""),
    ("schemas", True, ""),
    ("sandboxed_python", True, ""),
    ("event_streams", True, ""),
    ("webhooks", True, ""),
]

ENDPOINTS = {
    "info": "/",
    "health": "/health",
    "stats": "/api/stats",
    "sessions": "/api/sessions",
    "workflows": "/api/workflows",
    "executions": "/api/executions",
    "events": "/events",
    "webhooks": "/api/webhooks",
    "schemas": "/api/schemas/nodes",
}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the figure is unknown, reported as 0


@dataclass(frozen=True)
class SecurityCounters:
    """Where the security figures of GetStats come from (either may be absent)."""

    authenticator: Authenticator | None
    rate_limit: RateLimitService | None

    def stats(self) -> gateway_pb2.SecurityStats:
        limits = self.rate_limit.stats if self.rate_limit is not None else None
        return gateway_pb2.SecurityStats(
            failed_auth=self.authenticator.failed if self.authenticator is not None else 0,
            rate_limits=limits.limited if limits is not None else 0,
            rate_limit_backend_failures=limits.backend_failures if limits is not None else 0,
        )


class GatewayService(gateway_pb2_grpc.GatewayServiceServicer):
    """What the gateway is, how healthy and how busy."""

    def __init__(
        self,
        store: Store,
        metrics: RequestMetrics,
        *,
        executor: Executor,
        bus: EventBus,
        services: NodeServices,
        dispatcher: WebhookDispatcher,
        security: SecurityCounters | None = None,
        service_checks: HealthChecker | None = None,
        pool_checks: PoolHealth | None = None,
    ) -> None:
        self._pool_checks = pool_checks
        self._dispatcher = dispatcher
        self._service_checks = service_checks
        self._security = security or SecurityCounters(None, None)
        self._store = store
        self._metrics = metrics
        self._executor = executor
        self._bus = bus
        self._services = services
        self._started = timestamp_pb2.Timestamp()
        self._started.FromSeconds(int(metrics.started))
        self._checks: dict[str, Check] = {"database": store.ping}
        if services.sandbox is not None:
            self._checks["sandbox"] = services.sandbox.ping
        if isinstance(bus, RedisBus):
            self._checks["bus"] = bus.ping

    async def GetInfo(self, request: gateway_pb2.GetInfoRequest, context: Context) -> gateway_pb2.GatewayInfo:
        return gateway_pb2.GatewayInfo(
            name="flowport",
            version=VERSION,
            description="High-throughput, gRPC-first workflow gateway",
            api_version="v1",
            features=[gateway_pb2.Feature(name=n, enabled=e, detail=d) for n, e, d in FEATURES],
            endpoints=ENDPOINTS,
            start_time=self._started,
        )

    async def GetHealth(self, request: gateway_pb2.GetHealthRequest, context: Context) -> gateway_pb2.Health:
        names = list(self._checks)
        results = await asyncio.gather(*(run_check(self._checks[n], CHECK_TIMEOUT) for n in names))
        health = gateway_pb2.Health(version=VERSION, uptime=self._metrics.uptime)
        health.timestamp.GetCurrentTime()
        for name, result in zip(names, results, strict=True):
            component = health.components[name]
            # A sandbox worker being replaced slows user code, and without
            # Redis events stay within each process: both leave the gateway
            # serving, degraded, not unhealthy.
            component.status = (
                "degraded" if name in ("sandbox", "bus") and result.status == "unhealthy" else result.status
            )
            component.latency = round(result.latency_ms, 3)
            component.message = result.message
            component.last_check.FromNanoseconds(int(result.checked_at * 1e9))
        sweep = self._service_checks.last_sweep if self._service_checks is not None else None
        if sweep is not None:
            # Every tenant's registered services, as counts only (/health is public):
            # failing external services leave the gateway degraded, never down.
            external = health.components["external_apis"]
            external.status = "degraded" if sweep.failed else "healthy"
            external.last_check.FromNanoseconds(int(sweep.at * 1e9))
            external.details.update({"checked": sweep.checked, "failed_checks": sweep.failed})
            if sweep.failed:
                external.message = f"{sweep.failed} of {sweep.checked} registered services failed their last check"
        pools = self._pool_checks.last_sweep if self._pool_checks is not None else None
        if pools is not None and pools.checked:
            # The tenants' database resources (the seed's `database` with latency): an
            # external database failing degrades the gateway, it does not take it down.
            database_pools = health.components["database_pools"]
            database_pools.status = "degraded" if pools.failed else "healthy"
            database_pools.latency = pools.latency_ms
            database_pools.last_check.FromNanoseconds(int(pools.at * 1e9))
            database_pools.details.update({"checked": pools.checked, "failed_checks": pools.failed})
            if pools.failed:
                database_pools.message = f"{pools.failed} of {pools.checked} resource pools failed their last check"
        server = health.components["server"]
        server.status = "healthy"
        server.last_check.CopyFrom(health.timestamp)
        server.details.update(
            {
                "active_streams": self._metrics.active_streams,
                "calls": self._metrics.total,
                "running_executions": self._executor.running,
            }
        )
        health.status = overall([c.status for c in health.components.values()])
        return health

    async def GetStats(self, request: gateway_pb2.GetStatsRequest, context: Context) -> gateway_pb2.Stats:
        m = self._metrics
        c = self._executor.counters
        active = await self._store.count_active_sessions(now_us())
        return gateway_pb2.Stats(
            sessions=gateway_pb2.SessionStats(active=active),
            requests=gateway_pb2.RequestStats(
                total=m.total, errors=m.errors, error_rate=m.error_rate, avg_response_time=m.avg_response_ms
            ),
            realtime=gateway_pb2.RealtimeStats(active_streams=m.active_streams, events_published=self._bus.published),
            system=gateway_pb2.SystemStats(uptime=m.uptime, rss_bytes=_rss_bytes()),
            executions=gateway_pb2.ExecutionStats(
                started=c.started,
                succeeded=c.succeeded,
                failed=c.failed,
                cancelled=c.cancelled,
                running=self._executor.running,
                latency_p50=c.percentile(0.5),
                latency_p90=c.percentile(0.9),
                latency_p99=c.percentile(0.99),
                queued=c.queued,
                taken_from_queue=c.taken_from_queue,
                queue_failures=c.queue_failures,
            ),
            webhooks=self._dispatcher.stats(),
            security=self._security.stats(),
        )
