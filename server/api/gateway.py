"""GatewayService: info, health and stats of this server."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httpx
from google.api import httpbody_pb2
from google.protobuf import struct_pb2, timestamp_pb2
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from flowport.server.api.enterprise import DASHBOARD, durability_status, durable_requests, enterprise_health
from flowport.server.api.sessions import session_scope
from flowport.server.auth.authenticator import Authenticator
from flowport.server.clock import now_us
from flowport.server.engine.executor import Executor
from flowport.server.engine.registry import NodeRegistry
from flowport.server.errors import FailedPrecondition
from flowport.server.events.bus import EventBus
from flowport.server.health import Check, overall, run_check
from flowport.server.metrics import CallFigures, RequestMetrics
from flowport.server.nodes.base import NodeServices
from flowport.server.observability.edge import local_rate_limited
from flowport.server.observability.prometheus import Prometheus
from flowport.server.resources.pool_checks import PoolHealth
from flowport.server.service_checks import HealthChecker
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenancy import administered_tenant, tenant_of
from flowport.server.types import Context
from flowport.server.version import VERSION
from flowport.server.webhooks.dispatcher import WebhookDispatcher
from flowport.v1 import gateway_pb2, gateway_pb2_grpc

if TYPE_CHECKING:
    from flowport.server.events.redis_bus import RedisBus
    from flowport.server.ratelimit.service import RateLimitService

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

# Kailash's `features` keys, each with the flowport feature that serves it.
KAILASH_FEATURES = {
    "real_time": "event_streams",
    "dynamic_workflows": "workflows",
    "ai_chat": "",  # not offered: always false
}

# The Kailash server kind flowport answers for (GET / `type`, /health `server_type`):
# the enterprise server, which Kailash's create_gateway builds by default.
KAILASH_SERVER_TYPE = "enterprise_workflow_server"

# GET / `enterprise`: Kailash's capability names, each served here (see the proto's EnterpriseInfo).
ENTERPRISE = gateway_pb2.EnterpriseInfo(
    durability=True,
    async_execution=True,
    resource_management=True,
    health_checks=True,
    secret_management=True,  # /api/secrets, encrypted per tenant
    features=[
        "request_durability",  # executions are stored and resumed after a restart
        "resource_registry",  # /api/resources
        "secret_management",  # /api/secrets
        "async_workflows",  # CreateExecution returns at once
        "health_monitoring",  # /health, service and pool checks
        "resource_resolution",  # nodes name a resource instead of a connection string
        "enterprise_security",  # API keys, JWTs, roles, tenants, audit log
    ],
)

# The transport RequestMetrics.streams counts /ws connections under: each is a StreamEvents
# call of the /ws bridge, marked as such (per tenant, like every stream).
WEBSOCKET = "websocket"

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


def feature_flags() -> dict[str, bool]:
    """`features` as Kailash shapes it, a map of name to enabled: flowport's names and Kailash's."""
    enabled = {name: on for name, on, _ in FEATURES}
    return enabled | {name: enabled.get(ours, False) for name, ours in KAILASH_FEATURES.items()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the figure is unknown, reported as 0


@dataclass(frozen=True)
class SecurityCounters:
    """Where the security figures of GetStats come from (any may be absent)."""

    authenticator: Authenticator | None
    rate_limit: RateLimitService | None
    # Envoy's admin port (`flowport up`) and a client for it: its local rate limits' counters.
    envoy_admin_port: int | None = None
    http: httpx.AsyncClient | None = None

    async def stats(self, tenant: str | None = None) -> gateway_pb2.SecurityStats:
        """Every figure for the operator's admins (None); a tenant's own rate-limit refusals for
        the tenant's callers, its admins included."""
        limits = self.rate_limit.stats if self.rate_limit is not None else None
        if tenant is not None:
            refused = limits.limited_by_tenant[tenant] if limits is not None else 0
            return gateway_pb2.SecurityStats(rate_limits=refused, service_rate_limits=refused)
        service = limits.limited if limits is not None else 0
        edge = 0
        if self.envoy_admin_port is not None and self.http is not None:
            edge = await local_rate_limited(self.http, self.envoy_admin_port) or 0
        return gateway_pb2.SecurityStats(
            failed_auth=self.authenticator.failed if self.authenticator is not None else 0,
            rate_limits=service + edge,
            rate_limit_backend_failures=limits.backend_failures if limits is not None else 0,
            service_rate_limits=service,
            edge_rate_limits=edge,
        )


# Components that report what tenants registered, not the gateway: left out of its overall status.
TENANT_COMPONENTS = frozenset({"external_apis", "database_pools"})


class GatewayService(gateway_pb2_grpc.GatewayServiceServicer):
    """What the gateway is, how healthy and how busy."""

    def __init__(
        self,
        store: SqlStore,
        metrics: RequestMetrics,
        *,
        executor: Executor,
        bus: EventBus,
        services: NodeServices,
        dispatcher: WebhookDispatcher,
        security: SecurityCounters | None = None,
        service_checks: HealthChecker | None = None,
        pool_checks: PoolHealth | None = None,
        node_types: int | None = None,
        prometheus: Prometheus | None = None,
        title: str = "flowport",
        version: str = VERSION,
    ) -> None:
        # What answers show as `name` and `version` (--title, --display-version); `release` is VERSION.
        self._title = title
        self._version = version
        self._prometheus = prometheus
        self._node_types = len(NodeRegistry.default().names()) if node_types is None else node_types
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
        if bus.shared:
            self._checks["bus"] = cast("RedisBus", bus).ping

    async def GetInfo(self, request: gateway_pb2.GetInfoRequest, context: Context) -> gateway_pb2.GatewayInfo:
        return gateway_pb2.GatewayInfo(
            name=self._title,
            version=self._version,
            release=VERSION,
            description="High-throughput, gRPC-first workflow gateway",
            api_version="v1",
            features=[gateway_pb2.Feature(name=n, enabled=e, detail=d) for n, e, d in FEATURES],
            endpoints=ENDPOINTS,
            start_time=self._started,
            feature_flags=feature_flags(),
            uptime_seconds=time.time() - self._metrics.started,
            status="healthy",
            type=KAILASH_SERVER_TYPE,
            enterprise=ENTERPRISE,
        )

    async def GetHealth(self, request: gateway_pb2.GetHealthRequest, context: Context) -> gateway_pb2.Health:
        names = list(self._checks)
        results = await asyncio.gather(*(run_check(self._checks[n], CHECK_TIMEOUT) for n in names))
        health = gateway_pb2.Health(
            version=self._version,
            release=VERSION,
            uptime=self._metrics.uptime,
            uptime_seconds=time.time() - self._metrics.started,
            server_type=KAILASH_SERVER_TYPE,
        )
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
        # /health answers anyone: statuses and latencies only, never a count
        # (of executions, streams, calls, other tenants' services or pools):
        # those are GetStats', which scopes them to the caller.
        sweep = self._service_checks.last_sweep if self._service_checks is not None else None
        if sweep is not None:
            # Failing external services leave the gateway degraded, never down.
            external = health.components["external_apis"]
            external.status = "degraded" if sweep.failed else "healthy"
            external.last_check.FromNanoseconds(int(sweep.at * 1e9))
            if sweep.failed:
                external.message = "registered services failed their last check"
        pools = self._pool_checks.last_sweep if self._pool_checks is not None else None
        if pools is not None and pools.checked:
            # The tenants' database resources (the seed's `database` with latency): an
            # external database failing degrades the gateway, it does not take it down.
            database_pools = health.components["database_pools"]
            database_pools.status = "degraded" if pools.failed else "healthy"
            database_pools.latency = pools.latency_ms
            database_pools.last_check.FromNanoseconds(int(pools.at * 1e9))
            if pools.failed:
                database_pools.message = "resource pools failed their last check"
        self._kailash_components(health)
        server = health.components["server"]
        server.status = "healthy"
        server.last_check.CopyFrom(health.timestamp)
        # The tenants' own endpoints (registered services, database resources) are reported, but
        # one tenant's failing endpoint must not turn the gateway's status, which every tenant's
        # and the operator's monitors read, to degraded.
        health.status = overall([c.status for n, c in health.components.items() if n not in TENANT_COMPONENTS])
        return health

    async def GetMetrics(self, request: gateway_pb2.GetMetricsRequest, context: Context) -> httpbody_pb2.HttpBody:
        if self._prometheus is None:
            raise FailedPrecondition(
                "metrics are off: start the server with a --metrics-port (or --workers)", reason="METRICS_OFF"
            )
        # Reading every worker's files can take a moment: off the event loop.
        text = await asyncio.to_thread(self._prometheus.exposition)
        # generate_latest writes text format 0.0.4 (legacy names); --metrics-port labels it so too
        # unless a scraper asks for 1.0.0, and Kailash's clients expect 0.0.4.
        return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE_PLAIN_0_0_4, data=text)

    def _kailash_components(self, health: gateway_pb2.Health) -> None:
        """`authentication` and `websockets`, the components Kailash's /health reports. Statuses
        only: a count of open connections would tell anyone how busy other tenants are (it is
        `realtime.websocket_count` in GetStats)."""
        auth = health.components["authentication"]
        auth.last_check.CopyFrom(health.timestamp)
        authenticator = self._security.authenticator
        # Keys are verified against the store (the `database` check); what can be missing is the verifier.
        auth.status = "healthy" if authenticator is not None else "unhealthy"
        if authenticator is None:
            auth.message = "no credential verifier is loaded"
        elif authenticator.insecure:
            auth.message = "authentication is off (--insecure): every caller is an admin"
        websockets = health.components["websockets"]
        websockets.status = "healthy"  # /ws is served by this process, next to the streams it bridges
        websockets.last_check.CopyFrom(health.timestamp)
        # Kailash's own component names, each the status of what serves it here: sessions and
        # workflows live in the store, events travel on the bus (Redis, when set), and node
        # schemas are this process's registry.
        database = health.components["database"].status
        bus = health.components["bus"].status if "bus" in health.components else "healthy"
        for name, status in (("agent_ui", database), ("realtime", bus), ("schema_registry", "healthy")):
            component = health.components[name]
            component.status = status
            component.last_check.CopyFrom(health.timestamp)

    async def GetEnterpriseFeatures(
        self, request: gateway_pb2.GetEnterpriseFeaturesRequest, context: Context
    ) -> gateway_pb2.EnterpriseInfo:
        return ENTERPRISE

    async def GetEnterpriseHealth(
        self, request: gateway_pb2.GetEnterpriseHealthRequest, context: Context
    ) -> gateway_pb2.Health:
        health = await self.GetHealth(gateway_pb2.GetHealthRequest(), context)
        return enterprise_health(health, secrets_loaded=self._services.secrets is not None)

    async def GetDurabilityStatus(
        self, request: gateway_pb2.GetDurabilityStatusRequest, context: Context
    ) -> gateway_pb2.DurabilityStatus:
        return await durability_status(self._store, administered_tenant())

    async def GetDurableRequests(
        self, request: gateway_pb2.GetDurableRequestsRequest, context: Context
    ) -> struct_pb2.Struct:
        return await durable_requests(self._store, tenant_of(context), session_scope(context))

    async def GetDashboard(self, request: gateway_pb2.GetDashboardRequest, context: Context) -> gateway_pb2.Dashboard:
        return DASHBOARD

    async def GetStats(self, request: gateway_pb2.GetStatsRequest, context: Context) -> gateway_pb2.Stats:
        scope = administered_tenant()
        calls: CallFigures = self._metrics if scope is None else self._metrics.tenant(scope)
        counters = self._executor.counters if scope is None else self._executor.tenant_counters(scope)
        now = now_us()
        # The store's counts and Envoy's (over HTTP, for the operator's admins) at once.
        sessions, created, by_state, retrying, security, workflows = await asyncio.gather(
            self._store.count_sessions(scope, now),
            self._store.count_sessions_created(scope),
            self._store.executions_by_state(scope),
            self._store.deliveries_retrying(scope),
            self._security.stats(scope),
            self._store.count_workflows(scope),
        )
        uptime = time.time() - self._metrics.started
        running = self._executor.running if scope is None else by_state["running"]
        p50, p90, p99 = (calls.latency.percentile_ms(q) for q in (0.5, 0.9, 0.99))
        webhooks = self._dispatcher.stats(scope)
        webhooks.retrying = retrying
        stats = gateway_pb2.Stats(
            tenant=scope or "",
            sessions=gateway_pb2.SessionStats(active=sessions, created=created),
            requests=gateway_pb2.RequestStats(
                total=calls.total,
                errors=calls.errors,
                error_rate=calls.error_rate,
                avg_response_time=calls.avg_response_ms,
                latency_p50=p50,
                latency_p90=p90,
                latency_p99=p99,
            ),
            performance=gateway_pb2.PerformanceStats(
                avg_response_time=calls.avg_response_ms, p50=p50, p90=p90, p99=p99
            ),
            errors=gateway_pb2.ErrorStats(total=calls.errors, rate=calls.error_rate),
            realtime=gateway_pb2.RealtimeStats(
                active_streams=calls.active_streams,
                events_published=self._bus.published if scope is None else 0,
                grpc_count=calls.streams["grpc"],
                sse_count=calls.streams["sse"],
                ndjson_count=calls.streams["ndjson"],
                websocket_count=calls.streams[WEBSOCKET],
            ),
            system=gateway_pb2.SystemStats(uptime=self._metrics.uptime),
            executions=gateway_pb2.ExecutionStats(
                started=counters.started,
                succeeded=counters.succeeded,
                failed=counters.failed,
                cancelled=counters.cancelled,
                running=running,
                latency_p50=counters.percentile(0.5),
                latency_p90=counters.percentile(0.9),
                latency_p99=counters.percentile(0.99),
                by_state=by_state,
            ),
            webhooks=webhooks,
            security=security,
            uptime_seconds=uptime,
            gateway=gateway_pb2.GatewayFigures(
                name=self._title,
                version=self._version,
                title=self._title,
                release=VERSION,
                uptime_seconds=uptime,
                requests_processed=calls.total,
            ),
            agent_ui=gateway_pb2.AgentUiStats(
                active_sessions=sessions,
                total_sessions_created=created,
                workflows_executed=counters.started,
                active_executions=running,
                workflows=workflows,
            ),
            schema_registry=gateway_pb2.SchemaRegistryStats(node_types=self._node_types, workflows=workflows),
        )
        if scope is None:
            c = self._executor.counters
            stats.executions.queued, stats.executions.taken_from_queue = c.queued, c.taken_from_queue
            stats.executions.queue_failures = c.queue_failures
            stats.system.rss_bytes = _rss_bytes()
            connections, active, queries, average = self._store.query_figures()
            stats.database.CopyFrom(
                gateway_pb2.DatabaseStats(
                    connections=connections, active_connections=active, queries=queries, avg_query_time=average
                )
            )
        return stats
