"""Active health checks of registered services.

Every `interval` seconds, each live registration with an http(s) endpoint
and a `health_path` gets one GET of endpoint + path (no redirects followed,
`timeout` seconds, the body never read): a 2xx answer is HEALTHY. Each grpc(s):// endpoint gets
one `grpc.health.v1.Health/Check` for its `health_service`: SERVING is
HEALTHY. Anything else (another answer, a timeout, a refused connection) is
UNHEALTHY; the status, the latency and the time are recorded on the
registration. The endpoint is a tenant's input, so the request goes
through the same SSRF guard as HTTP nodes and webhooks (server/egress.py):
internal addresses are refused unless allowlisted (`--http-allowlist`), and
each check connects to the address that was checked (TLS still for the name).

Each process checks every registration (idempotent writes); with many
registrations and processes a claim per check would spread the work.

Tenants take turns. A sweep gives each tenant at most `PER_TENANT` checks in
flight out of the process's `PARALLEL` (their lanes wait for a place, the
tenant with the least recently checked service first), and starts no check
after `max(interval, timeout)`, so it ends at most a timeout later. What a
tenant has left waits for the next sweep, least recently checked first: a
tenant whose endpoints never answer holds only its own `PER_TENANT` places,
and every other tenant's checks go on in the rest.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowport.server.clock import now_us
from flowport.server.egress import (
    HTTP_ALLOWLIST_REMEDY,
    TargetRefused,
    TargetUnresolvable,
    check_target,
    failure_shown,
    route,
)
from flowport.server.periodic import Periodic
from flowport.server.resolver import RESOLVING_FOR
from flowport.server.storage.services import ServiceTables
from flowport.v1 import registry_pb2

HEALTHY = registry_pb2.RegisteredService.STATUS_HEALTHY
UNHEALTHY = registry_pb2.RegisteredService.STATUS_UNHEALTHY
PARALLEL = 16
PER_TENANT = 4


def checked(service: registry_pb2.RegisteredService) -> bool:
    """Whether the registry checks `service`: gRPC endpoints always, http(s) ones with a health_path."""
    return service.endpoint.startswith("grpc") or bool(service.health_path and service.endpoint)


class Probe(NamedTuple):
    """The outcome of one health check."""

    status: int
    latency_ms: float
    message: str
    """Why it is unhealthy, as the tenant sees it (RegisteredService.check_message); empty when healthy."""


async def probe(
    http: httpx.AsyncClient, service: registry_pb2.RegisteredService, allowlist: frozenset[str], timeout: float
) -> Probe:
    """One health check of `service`."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            if service.endpoint.startswith("grpc"):
                message = await _grpc_serving(service, allowlist)
            else:
                message = await _http_ok(http, service, allowlist)
    except (TargetRefused, TargetUnresolvable) as exc:
        message = exc.shown
    except httpx.HTTPError as exc:
        message = failure_shown(exc)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        message = f"the health check call failed ({code.name if code is not None else 'no status'})"
    except TimeoutError:
        message = f"no answer within {timeout:g} s"
    except OSError:
        message = "could not connect"
    latency = round(1000 * (time.perf_counter() - started), 3)
    return Probe(UNHEALTHY if message else HEALTHY, latency, message)


async def _http_ok(http: httpx.AsyncClient, service: registry_pb2.RegisteredService, allowlist: frozenset[str]) -> str:
    url = httpx.URL(service.endpoint).join(service.health_path)
    # To the address that was checked, never to a second answer for the name (egress.route).
    via = route(url, await check_target(url, allowlist, remedy=HTTP_ALLOWLIST_REMEDY))
    request = http.build_request(
        "GET", via.url, headers={"user-agent": "flowport-registry", **via.headers}, extensions=via.extensions
    )
    # Only the status matters: the body is never read. httpx would decode a gzip body whole, and a
    # few hundred KB of compressed zeros from a tenant's endpoint would take hundreds of MB and
    # hold the event loop while it expanded. Closing unread drops the connection.
    response = await http.send(request, stream=True, follow_redirects=False)
    await response.aclose()
    return "" if 200 <= response.status_code < 300 else f"answered HTTP {response.status_code}, not 2xx"


def _host_port(host: str, port: int | None) -> str:
    """`host:port`, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _grpc_serving(service: registry_pb2.RegisteredService, allowlist: frozenset[str]) -> str:
    endpoint = httpx.URL(service.endpoint)
    tls = endpoint.scheme == "grpcs"
    # The SSRF guard speaks URLs. The channel goes to the checked address, grpcs too: its TLS is
    # for the name still, as gRPC verifies the certificate against the default authority below.
    as_url = endpoint.copy_with(scheme="https" if tls else "http")
    checked = await check_target(as_url, allowlist, remedy=HTTP_ALLOWLIST_REMEDY)
    target = _host_port(checked or endpoint.host, endpoint.port)
    # One short-lived channel per check: checks are seconds apart, and no
    # connection state should carry between tenants' endpoints.
    options = [("grpc.enable_retries", 0), ("grpc.default_authority", _host_port(endpoint.host, endpoint.port))]
    channel = (
        grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
        if tls
        else grpc.aio.insecure_channel(target, options=options)
    )
    async with channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service.health_service)
        )
    if answer.status == health_pb2.HealthCheckResponse.SERVING:
        return ""
    return f"answered {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}, not SERVING"


@dataclass(frozen=True)
class Sweep:
    """One round of checks over every tenant's registrations: counts only, no names."""

    checked: int
    failed: int
    at: float  # unix seconds


class HealthChecker:
    """Checks every live registration with a health path, on a schedule."""

    def __init__(
        self,
        store: ServiceTables,
        http: httpx.AsyncClient,
        allowlist: frozenset[str],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self._store = store
        self._http = http
        self._allowlist = allowlist
        self._interval = interval
        self._timeout = timeout
        self.checks = 0
        # The last sweep, for GET /health's `external_apis` component.
        self.last_sweep: Sweep | None = None
        self._schedule = Periodic(self.check_all, interval, "service health checks")

    def start(self) -> None:
        self._schedule.start()

    async def close(self) -> None:
        await self._schedule.close()

    async def check_all(self) -> int:
        """Check due registrations, each tenant in its turns (module docstring); returns how many were checked."""
        due: dict[str, list[registry_pb2.RegisteredService]] = {}
        for tenant, service in await self._store.services_to_check(now_us()):
            if checked(service):
                due.setdefault(tenant, []).append(service)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self._interval, self._timeout)
        gate = asyncio.Semaphore(PARALLEL)  # wakes waiters in order: lanes of all tenants alternate
        outcomes: list[bool] = []

        async def lane(tenant: str, queue: deque[registry_pb2.RegisteredService]) -> None:
            RESOLVING_FOR.set(tenant)  # its own task (gather): the lookup is the tenant's (resolver.py)
            while True:
                async with gate:
                    # Both read once the gate is held: the tenant's other lanes took from the
                    # queue meanwhile, and the wait for the gate may have outlasted the window.
                    if not queue or loop.time() >= deadline:
                        return
                    service = queue.popleft()
                    done = await probe(self._http, service, self._allowlist, self._timeout)
                    await self._store.record_check(
                        tenant, service.service_id, done.status, done.latency_ms, now_us(), message=done.message
                    )
                outcomes.append(done.status == HEALTHY)

        tenants = []
        for tenant, services in due.items():
            # Least recently checked first (never checked: 0), so what one sweep leaves is next.
            queue = deque(sorted(services, key=lambda s: s.check_time.ToMicroseconds()))
            tenants.append((queue[0].check_time.ToMicroseconds(), random.random(), tenant, queue))  # noqa: S311 - an order
        # The gate serves waiters in order: the tenants whose oldest check is oldest first (ties in a
        # new order each sweep), so a tenant whose lanes waited past the window goes first next time.
        tenants.sort(key=lambda t: t[:2])
        lanes = [lane(tenant, queue) for _, _, tenant, queue in tenants for _ in range(min(PER_TENANT, len(queue)))]
        await asyncio.gather(*lanes)
        self.checks += len(outcomes)
        self.last_sweep = Sweep(checked=len(outcomes), failed=outcomes.count(False), at=time.time())
        return len(outcomes)
