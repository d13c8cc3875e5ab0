"""Assemble the gRPC server and run it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flowport.server.api.api_keys import ApiKeyService
from flowport.server.api.audit import AuditService
from flowport.server.api.events import EventService
from flowport.server.api.executions import ExecutionService
from flowport.server.api.gateway import GatewayService, SecurityCounters
from flowport.server.api.resources import ResourceService
from flowport.server.api.schemas import SchemaService
from flowport.server.api.secrets import SecretService
from flowport.server.api.service_registry import ServiceRegistryService
from flowport.server.api.sessions import SessionService
from flowport.server.api.webhooks import WebhookService
from flowport.server.api.workflows import WorkflowService
from flowport.server.audit import AuditRecorder, CallAuditor
from flowport.server.auth.authenticator import Authenticator
from flowport.server.auth.bootstrap import ensure_admin_key
from flowport.server.auth.keys import KeyAuthenticator
from flowport.server.auth.origin import TrustedProxies
from flowport.server.clock import now_us
from flowport.server.engine import execution_bytes
from flowport.server.engine.executor import Executor
from flowport.server.engine.plan import PlanCache
from flowport.server.engine.registry import NodeRegistry
from flowport.server.events.bus import EventBus
from flowport.server.events.log import EventLog
from flowport.server.events.websocket import WebSocketBridge
from flowport.server.interceptor import ErrorInterceptor, WrappingRegistrar
from flowport.server.leases import Leases
from flowport.server.limits import MAX_MESSAGE_BYTES, MAX_METADATA_BYTES, REQUEST_ID_RETENTION, tenant_share
from flowport.server.metrics import RequestMetrics
from flowport.server.nodes.base import NodeServices
from flowport.server.nodes.python_code import PythonCodeNode
from flowport.server.nodes.sql_pools import SqlPools
from flowport.server.observability import tracing
from flowport.server.observability.prometheus import Prometheus, multiprocess
from flowport.server.periodic import Periodic
from flowport.server.ratelimit import wire
from flowport.server.ratelimit.outbound import LocalLimiter, OutboundLimiter
from flowport.server.resources import settings_file
from flowport.server.resources.directory import ResourceDirectory
from flowport.server.resources.pool_checks import PoolHealth
from flowport.server.sandbox import SandboxLimits, SandboxPool
from flowport.server.secrets.keyring import KeyringError
from flowport.server.secrets.source import KeySource, open_key_source
from flowport.server.secrets.vault import SecretVault
from flowport.server.service_checks import HealthChecker
from flowport.server.settings import Settings
from flowport.server.shutdown import SHUTDOWN_MARGIN, STEP_LIMIT, Watchdog, bounded
from flowport.server.storage import MigrationError, SqlStore, open_store, request_ids
from flowport.server.tenant_shares import TenantShares
from flowport.server.webhooks.dispatcher import WebhookDispatcher
from flowport.v1 import (
    apikey_pb2,
    apikey_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
    schema_pb2,
    schema_pb2_grpc,
    secret_pb2,
    secret_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

if TYPE_CHECKING:
    from flowport.server.auth.jwt import JwtVerifier
    from flowport.server.ratelimit.service import RateLimitService

log = logging.getLogger("flowport.server")

PURGE_INTERVAL = 60.0
# Purge rounds between two that look at every webhook's deliveries (the others look at the busy ones').
FULL_DELIVERY_WALK = 60
# Writes of a webhook's deliveries past its retention count in one round (10,000 each).
DELIVERY_PURGE_BATCHES = 10
# Seconds between samples of gauges read from state (sandbox workers busy).
SAMPLE_INTERVAL = 1.0
# Finished webhook deliveries (succeeded or dead-lettered) are listed this long.
DELIVERY_RETENTION = 7 * 24 * 3600.0
# Deleted workflow versions are removed this long after their deletion (an execution created from
# one just before has long been written by then: its takeover finds the version).
DELETED_WORKFLOW_RETENTION = 3600.0
# Revoked and expired API keys are removed this long after their end (they count toward the
# tenant's objects until then; a call with one is told why it is refused until then).
ENDED_API_KEY_RETENTION = 30 * 24 * 3600.0
# Ended executions past retention are removed this many at a time (one write each), at most
# this many batches per purge round.
EXECUTION_PURGE_BATCH = 1000
EXECUTION_PURGE_BATCHES = 100

# Every service of the flowport.v1 API: each is served.
IMPLEMENTED = [
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    session_pb2.DESCRIPTOR.services_by_name["SessionService"],
    workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    execution_pb2.DESCRIPTOR.services_by_name["ExecutionService"],
    schema_pb2.DESCRIPTOR.services_by_name["SchemaService"],
    event_pb2.DESCRIPTOR.services_by_name["EventService"],
    webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"],
    apikey_pb2.DESCRIPTOR.services_by_name["ApiKeyService"],
    secret_pb2.DESCRIPTOR.services_by_name["SecretService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
    registry_pb2.DESCRIPTOR.services_by_name["ServiceRegistryService"],
    resource_pb2.DESCRIPTOR.services_by_name["ResourceService"],
]
ALL_SERVICES = [s.full_name for s in IMPLEMENTED]


class StartupError(RuntimeError):
    """The server could not start; the message says what to change."""


@dataclass
class Running:
    """A started server and everything it owns."""

    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    store: SqlStore
    port: int
    executor: Executor
    services: NodeServices
    bus: EventBus
    event_log: EventLog
    dispatcher: WebhookDispatcher
    # Everything start() opened, closed by stop() in reverse, each step bounded (server/shutdown.py).
    opened: contextlib.AsyncExitStack
    keys: KeyAuthenticator | None = None
    rate_limit: RateLimitService | None = None
    prometheus: Prometheus | None = None
    # /ws: its `connections` are the open WebSocket connections (None with --websocket-port 0).
    websocket: WebSocketBridge | None = None


async def _authenticator(
    store: SqlStore, keys: KeyAuthenticator, settings: Settings, audit: AuditRecorder
) -> Authenticator:
    if settings.insecure_no_auth:
        log.warning("AUTHENTICATION IS OFF (--insecure-no-auth): every caller acts as an admin of tenant 'default'")
    else:
        written = await ensure_admin_key(store, settings)
        if written is not None:
            log.warning("admin API key: %s", written)
    proxies = TrustedProxies(settings.trusted_proxies)
    if proxies.everyone:
        log.warning(
            "--trusted-proxies holds a network of every address: any caller can name its own client address "
            "(audit, the slow-down after failed logins)"
        )
    return Authenticator(
        keys,
        _jwt_verifier(settings),
        insecure=settings.insecure_no_auth,
        max_failures=settings.max_login_attempts,
        trusted_proxies=proxies,
        audit=audit,
    )


def _rate_limit_service(settings: Settings, keys: KeyAuthenticator) -> RateLimitService | None:
    """Envoy's rate limit service with counters in Redis, when a per-tenant limit is set."""
    if not settings.rate_limit_tenant_max_requests or settings.redis_url is None:
        return None
    # Redis clients load only when Redis is configured: a default start never imports them.
    from flowport.server.ratelimit.counters import RedisCounters
    from flowport.server.ratelimit.service import RateLimitService

    return RateLimitService(
        RedisCounters(settings.redis_url.get_secret_value()),
        keys,
        _jwt_verifier(settings),
        limit=settings.rate_limit_tenant_max_requests,
        window=settings.rate_limit_time_window,
        fail_open=settings.rate_limit_fail_open,
    )


def _jwt_verifier(settings: Settings) -> JwtVerifier | None:
    if settings.jwt_secret is None and settings.jwt_jwks_file is None:
        return None
    # PyJWT loads only when bearer tokens are configured.
    from flowport.server.auth.jwt import JwtConfig, JwtConfigError, JwtVerifier

    config = JwtConfig(
        secret=settings.jwt_secret.get_secret_value().encode() if settings.jwt_secret else None,
        jwks_file=settings.jwt_jwks_file,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        # Only the algorithms the configured keys can verify.
        algorithms=tuple(
            a
            for a in settings.jwt_algorithms
            if (a.startswith("HS") and settings.jwt_secret) or (not a.startswith("HS") and settings.jwt_jwks_file)
        ),
        leeway=settings.jwt_leeway,
        tenant_claim=settings.jwt_tenant_claim,
        subject_claim=settings.jwt_subject_claim,
        roles_claim=settings.jwt_roles_claim,
    )
    try:
        return JwtVerifier(config)
    except JwtConfigError as exc:
        raise StartupError(f"bearer tokens: {exc}") from None


async def _start_sandbox(settings: Settings) -> SandboxPool:
    """The pool of sandbox workers PythonCodeNode runs in, started (its workers boot)."""
    if settings.dev:
        log.warning(
            "--dev is for local development only: HTTP nodes, service checks and webhooks may reach this machine"
            " (loopback)"
        )
    limits = SandboxLimits(
        cpu_seconds=settings.sandbox_cpu_seconds,
        memory_bytes=settings.sandbox_memory_mb * 2**20,
        wall_seconds=PythonCodeNode.max_timeout,
    )
    size = settings.sandbox_workers or os.cpu_count() or 1
    sandbox = SandboxPool(
        size=size,
        limits=limits,
        tenant_share=tenant_share(settings.tenant_sandbox_share, size),
        landlock_mode=settings.sandbox_landlock,
    )
    await sandbox.start()
    _report_confinement(settings, sandbox)
    return sandbox


# The Landlock ABI from which a confined worker cannot signal processes outside its domain.
SIGNAL_SCOPED_ABI = 6


def _report_confinement(settings: Settings, sandbox: SandboxPool) -> None:
    """Say at start how far the kernel confines the sandbox workers, and what it cannot hide from them."""
    if sandbox.landlock_rules and sandbox.seccomp != "1":
        log.warning(
            "sandbox workers may create sockets: their seccomp filter is not installed (%s)",
            sandbox.seccomp.partition(":")[2].strip() or sandbox.seccomp,
        )
    abi, _, why = sandbox.landlock.partition(":")
    if abi == "0":
        log.warning(
            "sandbox workers are not confined by Landlock (%s): the audit hook and resource limits remain", why.strip()
        )
        return
    log.debug("sandbox workers confined by Landlock ABI %s", abi)
    if int(abi) < SIGNAL_SCOPED_ABI and os.geteuid() != 0:
        log.warning(
            "this kernel's Landlock (ABI %s) does not stop sandbox workers signalling the server, whose uid they "
            "share (ABI %d does; as root, workers become nobody)",
            abi,
            SIGNAL_SCOPED_ABI,
        )
    private = [settings.data_dir, settings.sqlite_root, settings.secrets_key_file, settings.resources_file]
    roots = [Path(os.path.realpath(root)) for root in sandbox.landlock_rules.get("read", ())]
    for path in private:
        if path is None:
            continue
        where = path.resolve()
        for root in roots:
            if where.is_relative_to(root):
                log.warning("%s lies in %s, which sandbox workers may read: keep data and keys out of it", where, root)


# Connections of the pool every HTTP node of this process shares, and of webhook deliveries'.
HTTP_NODE_CONNECTIONS = 256
WEBHOOK_CONNECTIONS = 256


def _node_services(
    settings: Settings,
    sandbox: SandboxPool,
    *,
    sql: SqlPools,
    vault: SecretVault,
    resources: ResourceDirectory,
    store: SqlStore,
) -> NodeServices:
    """What every node run in this process shares, complete."""
    return NodeServices(
        # One connection pool for every HTTP node of every execution.
        http=outbound_client(HTTP_NODE_CONNECTIONS),
        # One tenant's requests hold at most its share of those connections (as of execution slots).
        http_shares=TenantShares(tenant_share(settings.tenant_execution_share, HTTP_NODE_CONNECTIONS)),
        sandbox=sandbox,
        sql=sql,
        http_allowlist=settings.http_node_allowlist,
        # Nodes open secrets through the vault, for their execution's tenant only.
        secrets=vault,
        # For MCPServiceDiscoveryNode: the execution's tenant's registrations.
        registry=store,
        outbound=_outbound_limiter(settings),
        resources=resources,
    )


def outbound_client(connections: int) -> httpx.AsyncClient:
    """An HTTP client for calls every tenant's nodes (or webhooks) share.

    trust_env off, so no proxy from the environment carries requests past the SSRF check (which
    vets the address the node itself connects to). No cookie jar: requests never carry the
    client's cookies, and a jar shared by every tenant would keep each Set-Cookie any target
    sends, without bound, for the life of the process.
    """
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=64),
        trust_env=False,
        cookies=CookieJar(policy=_KeepNoCookies()),
    )


class _KeepNoCookies(DefaultCookiePolicy):
    """Every Set-Cookie is refused: the jar stays empty."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False


def _outbound_limiter(settings: Settings) -> OutboundLimiter:
    """RateLimitedAPINode's limits: with Redis they hold across every process that shares it."""
    if settings.redis_url is None:
        return LocalLimiter()
    from flowport.server.ratelimit.outbound_redis import RedisLimiter

    return RedisLimiter(settings.redis_url.get_secret_value())


async def _close_node_services(services: NodeServices) -> None:
    """Close what `_node_services` opened (the sandbox pool is closed on its own)."""
    if services.http is not None:
        await services.http.aclose()
    if services.sql is not None:
        await services.sql.close()
    if services.outbound is not None:
        await services.outbound.close()


def _declared_resources(settings: Settings) -> list[resource_pb2.Resource]:
    if settings.resources_file is None:
        return []
    try:
        return settings_file.load(settings.resources_file)
    except settings_file.ResourcesFileError as exc:
        raise StartupError(f"resources: {exc}") from None


def _secret_keys(settings: Settings) -> KeySource:
    try:
        return open_key_source(settings)
    except KeyringError as exc:
        raise StartupError(f"secrets: {exc}") from None


async def start(settings: Settings) -> Running:
    """Open the store, start the sandbox pool, bind the port and serve.

    Executions a previous process left unfinished are resumed (or failed as
    INTERRUPTED) once the server is up. Raises StartupError.
    """
    # Before anything starts: without its key no secret can be stored or read.
    secret_keys = _secret_keys(settings)
    declared = _declared_resources(settings)
    # Whatever opened is closed again, in reverse, when a later step fails.
    async with contextlib.AsyncExitStack() as opened:
        running = await _start(settings, secret_keys, declared, opened)
        running.opened = opened.pop_all()
    return running


@dataclass
class _Core:
    """The store and what nodes share: opened first, used by everything after."""

    store: SqlStore
    services: NodeServices
    sql: SqlPools
    vault: SecretVault
    resources: ResourceDirectory


@dataclass
class _Engine:
    """What runs work: webhook deliveries and executions, and the request figures."""

    dispatcher: WebhookDispatcher
    executor: Executor
    plans: PlanCache
    registry: NodeRegistry
    prometheus: Prometheus | None


async def _start(
    settings: Settings,
    secret_keys: KeySource,
    declared: list[resource_pb2.Resource],
    opened: contextlib.AsyncExitStack,
) -> Running:
    """The start-up sequence, in order; whatever opens is pushed on `opened`."""
    # Spans from the first call on; none of this runs (or loads) without --otlp-endpoint.
    try:
        tracing_owner = tracing.setup(settings) is not None
    except tracing.TracingUnavailable as exc:
        raise StartupError(f"tracing (--otlp-endpoint): {exc}") from None
    if tracing_owner:
        # Exports the spans still buffered; in a thread, so a collector that hangs cannot hold the loop.
        opened.push_async_callback(bounded("tracing", asyncio.to_thread, tracing.shutdown))
    core = await _open_core(settings, secret_keys, declared, opened)
    event_log, bus = await EventLog.open(
        core.store,
        queue_size=settings.event_queue_size,
        retention_count=settings.event_retention_count,
        retention_seconds=settings.event_retention_seconds,
        # With Redis, events cross processes (server/events/redis_bus.py).
        redis_url=settings.redis_url.get_secret_value() if settings.redis_url is not None else None,
    )
    opened.push_async_callback(bounded("the event log", event_log.close))
    # Its own pool, so slow receivers and node traffic cannot starve each other.
    webhook_http = outbound_client(WEBHOOK_CONNECTIONS)
    opened.push_async_callback(bounded("the webhook HTTP client", webhook_http.aclose))
    checker, pool_health = _start_checks(settings, core, webhook_http, opened)
    engine = await _start_engine(settings, core, bus, webhook_http, opened)
    keys = KeyAuthenticator(store := core.store)
    keys.follow(bus)
    opened.push_async_callback(bounded("API key cache", keys.close))
    audit = AuditRecorder(store)
    # Pending aggregates of throttled entries, queued before the store drains.
    opened.push_async_callback(bounded("the audit log", audit.close))
    authenticator = await _authenticator(store, keys, settings, audit)
    metrics = RequestMetrics()
    grpc_server = grpc.aio.server(
        options=[
            # Without this a second server would silently share the port.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ],
    )
    # Every service is registered through this, so each method handler is
    # wrapped by the interceptor's logic (errors, auth, metrics, audit).
    interceptor = ErrorInterceptor(
        metrics,
        authenticator,
        CallAuditor(audit, authenticator.origin_of),
        engine.prometheus,
        tenant_max_streams=settings.tenant_max_streams,
    )
    registrar = WrappingRegistrar(grpc_server, interceptor)
    rate_limit = _rate_limit_service(settings, keys)
    if rate_limit is not None:
        opened.push_async_callback(bounded("the rate limit service", rate_limit.close))
        rate_limit.prometheus = engine.prometheus
        registrar.add_registered_method_handlers(wire.SERVICE, rate_limit.method_handlers())
    gateway = GatewayService(
        store,
        metrics,
        executor=engine.executor,
        bus=bus,
        services=core.services,
        dispatcher=engine.dispatcher,
        # Envoy's admin answers on --admin-port when `flowport up` runs it (nothing there: zero).
        security=SecurityCounters(authenticator, rate_limit, settings.admin_port, webhook_http),
        service_checks=checker,
        pool_checks=pool_health,
        prometheus=engine.prometheus,
        title=settings.title,
        version=settings.shown_version,
    )
    server = cast("grpc.aio.Server", registrar)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
    _add_services(server, settings, core, engine, bus=bus, event_log=event_log, keys=keys, audit=audit)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*ALL_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = _bind(settings, grpc_server)
    _serve_metrics(settings, engine.prometheus)  # after the gRPC port: a second server fails on that one first
    await grpc_server.start()
    opened.push_async_callback(bounded("the gRPC server", grpc_server.stop, None))
    websocket = await _start_websocket(settings, bus)
    if websocket is not None:
        opened.push_async_callback(bounded("the /ws bridge", websocket.stop))
    resumed, failed = await engine.executor.recover()
    engine.executor.start_leasing()
    if resumed or failed:
        log.info("after restart: %d executions resumed, %d failed as INTERRUPTED", resumed, failed)
    for name in ["", *ALL_SERVICES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(
        grpc_server,
        health_servicer,
        store,
        port,
        engine.executor,
        core.services,
        bus,
        event_log,
        engine.dispatcher,
        opened,  # start() hands over what it holds
        keys,
        rate_limit,
        engine.prometheus,
        websocket,
    )


async def _open_core(
    settings: Settings,
    secret_keys: KeySource,
    declared: list[resource_pb2.Resource],
    opened: contextlib.AsyncExitStack,
) -> _Core:
    """The store (migrated, with the settings file's resources applied) and the node services."""
    # Sandbox workers boot while the database opens.
    store_opening, sandbox_opening = await asyncio.gather(
        open_store(settings), _start_sandbox(settings), return_exceptions=True
    )
    if isinstance(store_opening, SqlStore):
        opened.push_async_callback(bounded("the store", store_opening.close))
    if isinstance(sandbox_opening, SandboxPool):
        opened.push_async_callback(bounded("the sandbox pool", sandbox_opening.close))
    for outcome in (store_opening, sandbox_opening):
        if isinstance(outcome, BaseException):
            raise outcome
    assert isinstance(store_opening, SqlStore) and isinstance(sandbox_opening, SandboxPool)
    store = store_opening
    sql = SqlPools(frozenset(settings.sql_allowlist), sqlite_root=settings.sqlite_root)
    vault = SecretVault(store, secret_keys)
    resources = ResourceDirectory(store, sql)
    services = _node_services(settings, sandbox_opening, sql=sql, vault=vault, resources=resources, store=store)
    opened.push_async_callback(bounded("the node services", _close_node_services, services))
    await settings_file.apply(store, declared, now_us())
    return _Core(store, services, sql, vault, resources)


def _start_checks(
    settings: Settings, core: _Core, http: httpx.AsyncClient, opened: contextlib.AsyncExitStack
) -> tuple[HealthChecker, PoolHealth]:
    """Periodic health checks of the tenants' registered services and resource pools."""
    # Registered services' endpoints are tenants' input: the nodes' allowlist
    # and SSRF guard apply to their health checks too.
    checker = HealthChecker(
        core.store,
        http,
        settings.http_node_allowlist,
        interval=settings.service_check_interval,
        timeout=settings.service_check_timeout,
    )
    checker.start()
    opened.push_async_callback(bounded("service health checks", checker.close))
    pool_health = PoolHealth(
        core.sql, core.resources, interval=settings.service_check_interval, timeout=settings.service_check_timeout
    )
    pool_health.start()
    opened.push_async_callback(bounded("resource pool health checks", pool_health.close))
    return checker, pool_health


async def _start_engine(
    settings: Settings, core: _Core, bus: EventBus, http: httpx.AsyncClient, opened: contextlib.AsyncExitStack
) -> _Engine:
    """Webhook deliveries, the executor (with the shared work queue, given Redis and
    PostgreSQL) and Prometheus metrics; executions are not recovered yet."""
    store = core.store
    # One lease holder per process, for its executions and webhook deliveries.
    leases = Leases(settings.execution_lease_seconds)
    dispatcher = WebhookDispatcher(
        store,
        bus,
        http,
        settings,
        leases=leases,
        exclusive=store.dialect == "sqlite",
        tenant_share=tenant_share(settings.tenant_execution_share, WEBHOOK_CONNECTIONS),
    )
    await dispatcher.start()
    # Unsent deliveries stay queued in the store and resume at the next start.
    opened.push_async_callback(bounded("webhook deliveries", dispatcher.close))
    bus.add_listener(dispatcher.on_event)
    # Processes sharing PostgreSQL and Redis hand work they have no room
    # for to each other; a SQLite file is this process's alone.
    work_queue = None
    if settings.redis_url is not None and store.dialect != "sqlite":
        from flowport.server.engine.redis_work_queue import RedisWorkQueue

        work_queue = RedisWorkQueue(settings.redis_url.get_secret_value(), consumer=leases.owner)
        opened.push_async_callback(bounded("the work queue", work_queue.close))
    registry = NodeRegistry.default()
    plans = PlanCache(registry)
    opened.callback(plans.checks.close)
    executor = Executor(
        store,
        plans,
        bus,
        core.services,
        max_concurrent=settings.max_concurrent_executions,
        leases=leases,
        exclusive=store.dialect == "sqlite",
        queue=work_queue,
        tenant_share=tenant_share(settings.tenant_execution_share, settings.max_concurrent_executions),
        tenant_max_bytes=settings.tenant_max_execution_bytes or None,
        tenant_max_output_bytes=settings.tenant_max_running_output_bytes or None,
    )
    # Executions are left RUNNING with their leases released: resumed at the next start or elsewhere.
    opened.push_async_callback(bounded("executions", executor.shutdown))
    prometheus = _prometheus(settings, store, core.services)
    if prometheus is not None:
        opened.push_async_callback(bounded("metrics", prometheus.close))
        executor.prometheus = dispatcher.prometheus = prometheus
        sampling = Periodic(
            functools.partial(_sample, prometheus, core.services, dispatcher), SAMPLE_INTERVAL, "metrics sampling"
        )
        sampling.start()
        opened.push_async_callback(bounded("metrics sampling", sampling.close))
    return _Engine(dispatcher, executor, plans, registry, prometheus)


def _add_services(
    server: grpc.aio.Server,
    settings: Settings,
    core: _Core,
    engine: _Engine,
    *,
    bus: EventBus,
    event_log: EventLog,
    keys: KeyAuthenticator,
    audit: AuditRecorder,
) -> None:
    """Register the flowport.v1 services (GatewayService apart: it needs the server's counters)."""
    store = core.store
    session_pb2_grpc.add_SessionServiceServicer_to_server(SessionService(store, settings, bus), server)
    workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(
        WorkflowService(store, engine.registry, bus, engine.plans.checks), server
    )
    execution_pb2_grpc.add_ExecutionServiceServicer_to_server(
        ExecutionService(store, engine.executor, bus, settings.stream_heartbeat), server
    )
    schema_pb2_grpc.add_SchemaServiceServicer_to_server(SchemaService(store, engine.registry, engine.plans), server)
    event_pb2_grpc.add_EventServiceServicer_to_server(
        EventService(bus, event_log, settings.stream_heartbeat, store), server
    )
    webhook_pb2_grpc.add_WebhookServiceServicer_to_server(
        WebhookService(store, engine.dispatcher, bus, settings), server
    )
    apikey_pb2_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyService(store, keys, bus), server)
    secret_pb2_grpc.add_SecretServiceServicer_to_server(SecretService(store, core.vault), server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditService(store, audit), server)
    registry_pb2_grpc.add_ServiceRegistryServiceServicer_to_server(ServiceRegistryService(store), server)
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(ResourceService(store, core.resources), server)


def _bind(settings: Settings, grpc_server: grpc.aio.Server) -> int:
    """The gRPC port, bound (not yet serving); StartupError naming the flag when it cannot be."""
    host = settings.grpc_host
    address = f"{'[' + host + ']' if ':' in host else host}:{settings.grpc_port}"
    cause = ""
    try:
        port = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        port, cause = 0, f" ({exc})"
    if port == 0:
        raise StartupError(
            f"cannot listen on {address} (--grpc-port {settings.grpc_port}): "
            f"the port is in use or the address is not available{cause}"
        )
    return port


async def _unless(hurry: asyncio.Event | None, step: Awaitable[object]) -> None:
    """Await `step`; cancel it if `hurry` is set first (a second stop signal)."""
    task = asyncio.ensure_future(step)
    if hurry is None:
        await task
        return
    waiter = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stop(running: Running, grace: float, drain: float = 0.0, hurry: asyncio.Event | None = None) -> None:
    """Shut down without failing a call that Envoy could have sent elsewhere.

    Report NOT_SERVING at once and take no more queued work; keep serving
    for `drain` seconds, while Envoy's health checks take this server out
    of rotation; then end the event streams cleanly (their clients resume
    by id on another server) and close /ws (1001, going away); stop taking
    calls, giving in-flight ones, and the executions running here, `grace`
    to finish; then close the rest in reverse of opening (executions still
    running are left RUNNING with their leases released, for another
    process or the next start). Each step is bounded: see server/shutdown.py.

    Once `hurry` is set (`serve` sets it on a second SIGTERM or SIGINT), what
    is left of the drain is skipped and in-flight calls are cancelled at
    once: the rest of the steps still run, so nothing that is stored is lost.
    """
    await running.health.enter_graceful_shutdown()
    if running.websocket is not None:
        running.websocket.draining = True
    await bounded("taking executions", running.executor.stop_taking)()
    if drain > 0:
        log.info("draining: reporting NOT_SERVING, still serving for %.1fs (--drain-seconds)", drain)
        await _unless(hurry, asyncio.sleep(drain))
    if running.websocket is not None:
        # Its clients reconnect (1001, going away), to another server if any.
        await bounded("the /ws bridge", running.websocket.stop)()
    ended = running.bus.end_streams()
    if ended:
        log.info("ended %d event streams; their clients resume elsewhere", ended)

    async def cut_grace() -> None:
        assert hurry is not None
        await hurry.wait()
        # The shorter grace wins over the call below.
        await bounded("the gRPC server, at once", running.server.stop, None)()

    cutter = asyncio.create_task(cut_grace()) if hurry is not None else None
    try:
        await asyncio.gather(
            bounded("the gRPC server", running.server.stop, grace, limit=grace + STEP_LIMIT)(),
            _unless(
                hurry, bounded("executions running here", running.executor.settle, grace, limit=grace + STEP_LIMIT)()
            ),
        )
    finally:
        if cutter is not None:
            cutter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cutter
    await running.opened.aclose()  # stopping the server and /ws again is a no-op


async def _start_websocket(settings: Settings, bus: EventBus) -> WebSocketBridge | None:
    """The /ws bridge on --websocket-port, streaming from this server's own gRPC port."""
    if not settings.websocket_port:
        return None
    bridge = WebSocketBridge(
        settings.grpc_target,
        require_credential=not settings.insecure_no_auth,
        trusted_proxies=TrustedProxies(settings.trusted_proxies),
        head=lambda: bus.last_id,
        ping_interval=settings.stream_heartbeat,
    )
    try:
        await bridge.start(settings.grpc_host, settings.websocket_port)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {settings.grpc_host}:{settings.websocket_port} (--websocket-port): {exc.strerror or exc}"
        ) from None
    return bridge


def _prometheus(settings: Settings, store: SqlStore, services: NodeServices) -> Prometheus | None:
    """The process's Prometheus metrics; None when --metrics-port is 0 (and no other worker serves them)."""
    if not settings.metrics_port and not multiprocess():
        return None
    prometheus = Prometheus()
    store.observe_queries(lambda operation, seconds: prometheus.store_duration.labels(operation).observe(seconds))
    if services.sandbox is not None:
        prometheus.sandbox_workers.set(services.sandbox.size)
    return prometheus


def _serve_metrics(settings: Settings, prometheus: Prometheus | None) -> None:
    if prometheus is None or not settings.metrics_port:
        return
    try:
        prometheus.serve(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} (--metrics-port): "
            f"{exc.strerror or exc}"
        ) from None


async def _sample(prometheus: Prometheus, services: NodeServices, dispatcher: WebhookDispatcher) -> None:
    """Gauges read from state rather than counted at each change: the sandbox pool's, the deliveries held."""
    if services.sandbox is not None:
        prometheus.sandbox_busy.set(services.sandbox.busy)
    prometheus.webhook_pending.set(dispatcher.unfinished)


@dataclass
class DeliveryWalk:
    """Which webhooks' deliveries past `--webhook-delivery-retention-count` a purge round looks at:
    every webhook at the first round, once every FULL_DELIVERY_WALK rounds, and after a round that
    did not finish one's; between them, only those with a delivery finished since the last round
    (less a round's interval, for what committed while that round ran)."""

    rounds: int = 0
    walked_to: int | None = None
    full_due: bool = True

    def since(self) -> int:
        """This round's `finished_since_us` (0: every webhook)."""
        if self.rounds % FULL_DELIVERY_WALK == 0:
            self.full_due = True
        self.rounds += 1
        return 0 if self.full_due or self.walked_to is None else self.walked_to

    def walked(self, now: int, since: int, capped: bool) -> None:
        """The round of `now` looked at what `since` said; `capped`: some webhook has more left."""
        self.walked_to = now - int(PURGE_INTERVAL * 1e6)
        self.full_due = capped or (self.full_due and since != 0)


async def purge_expired_rows(store: SqlStore, settings: Settings, now: int, walk: DeliveryWalk | None = None) -> int:
    """One round of the purge: expired sessions, request ids and service registrations, API keys
    30 days after their revocation or expiry, old finished
    webhook deliveries and each webhook's past its newest `--webhook-delivery-retention-count`
    (of the webhooks `walk` says; every webhook without one),
    workflow versions deleted an hour ago, ended executions past
    `--execution-retention-seconds`, the oldest ended executions of tenants past
    `--tenant-max-execution-bytes`, and the oldest request ids of tenants past
    `--tenant-max-request-id-bytes`; returns how many rows went."""
    removed = await store.purge_expired(now, now - int(REQUEST_ID_RETENTION * 1e6))
    removed += await store.purge_finished_deliveries(now - int(DELIVERY_RETENTION * 1e6))
    since = 0 if walk is None else walk.since()
    capped: list[tuple[str, str]] = []
    removed += await store.purge_deliveries_beyond(
        settings.webhook_delivery_retention_count,
        finished_since_us=since,
        batches=DELIVERY_PURGE_BATCHES,
        capped=capped,
    )
    if walk is not None:
        walk.walked(now, since, bool(capped))
    removed += await store.purge_expired_services(now)
    removed += await store.purge_deleted_workflows(now - int(DELETED_WORKFLOW_RETENTION * 1e6))
    removed += await store.purge_ended_api_keys(now - int(ENDED_API_KEY_RETENTION * 1e6))
    if settings.execution_retention_seconds:
        before = now - int(settings.execution_retention_seconds * 1e6)
        # Bounded per round: a backlog (retention just turned on) goes over several rounds.
        for _ in range(EXECUTION_PURGE_BATCHES):
            gone = await store.purge_ended_executions(before, batch=EXECUTION_PURGE_BATCH)
            removed += gone
            if gone < EXECUTION_PURGE_BATCH:
                break
    await store.fold_execution_bytes()
    await store.fold_request_id_bytes()
    if settings.tenant_max_execution_bytes:
        removed += await execution_bytes.trim_all(store, settings.tenant_max_execution_bytes)
    if settings.tenant_max_request_id_bytes:
        removed += await request_ids.forget_beyond(store, settings.tenant_max_request_id_bytes)
    return removed


async def _purge_forever(store: SqlStore, settings: Settings) -> None:
    walk = DeliveryWalk()
    while True:
        await asyncio.sleep(PURGE_INTERVAL)
        try:
            removed = await purge_expired_rows(store, settings, now_us(), walk)
        except Exception:
            log.exception("purging expired rows failed; will retry")
        else:
            if removed:
                log.debug("purged %d expired rows", removed)


async def serve(settings: Settings, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    running = await start(settings)
    # What starting made (modules, descriptors, settings, pools) lives as long as the process:
    # full collections no longer walk it each time they run.
    gc.freeze()
    log.info("gRPC server listening on %s:%d", settings.grpc_host, running.port)
    if on_ready is not None:
        on_ready(running.port)
    stopping = asyncio.Event()
    hurry = asyncio.Event()
    drain = 0.0
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        nonlocal drain
        # SIGTERM is an orchestrator's (or a rolling restart's): drain first. SIGINT is Ctrl-C
        # at a terminal, or `flowport up` stopping its servers together with Envoy: nobody
        # is left to take the calls, so the drain would only delay the stop.
        if not stopping.is_set():
            drain = settings.drain_seconds if sig == signal.SIGTERM else 0.0
            stopping.set()
        elif not hurry.is_set():
            # A second signal: whoever sent it wants the process gone now, not after the drain and grace.
            log.warning("%s again: skipping the rest of the drain and cancelling in-flight calls", sig.name)
            hurry.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    purger = asyncio.create_task(_purge_forever(running.store, settings))
    try:
        await stopping.wait()
        log.info(
            "shutting down: draining %.1fs, then finishing in-flight calls (grace %.1fs)",
            drain,
            settings.shutdown_grace,
        )
        # Armed at the signal; disarmed by the process ending (a daemon thread).
        Watchdog(drain + settings.shutdown_grace + SHUTDOWN_MARGIN).arm(loop)
    finally:
        purger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purger
        await stop(running, settings.shutdown_grace, drain, hurry)
    log.info("stopped")


def run(settings: Settings) -> int:
    """Run `serve` on uvloop (where available); return a process exit code."""
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # Windows: the default loop
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except (StartupError, MigrationError) as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return 2
    return 0
