"""ServiceRegistryService: a tenant's catalogue of external services, with TTLs renewed by heartbeats.

Health checks run in the background (server/service_checks.py) and set
`status`, `latency_ms` and `check_time`, and GET /health's `external_apis`
component counts the failures; MCPServiceDiscoveryNode reads the registry
(server/nodes/service_discovery.py).
"""

from __future__ import annotations

import re

import httpx
from google.protobuf import empty_pb2

from flowport.server import pagination
from flowport.server.api.common import check_request_id, clear_output_only, idempotency_key, request_id_reused
from flowport.server.clock import now_us, timestamp
from flowport.server.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from flowport.server.storage import IdempotencyConflict
from flowport.server.storage.services import ServiceTables
from flowport.server.tenancy import tenant_of
from flowport.server.types import Context
from flowport.v1 import registry_pb2, registry_pb2_grpc

SERVICE_ID = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
ID_RULE = "1 to 63 characters: a-z, 0-9, '_' and '-', starting with a letter or digit"
LABEL = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
LABEL_RULE = "1 to 64 characters: letters, digits, '_', '.', ':' and '-'"
MIN_TTL_S, MAX_TTL_S = 1, 24 * 3600
MAX_LABELS = 32
MAX_ENDPOINT = 2048
# A registration's metadata, encoded: discovery reads up to 5000 registrations of a tenant at once.
MAX_METADATA_BYTES = 16 * 2**10
SCHEMES = ("http", "https", "grpc", "grpcs")
# Reads past a page's worth of rows the capability and zone filters dropped, up to this many in all.
MAX_SCANNED = 5000
SCAN_BATCH = 500  # rows read at a time while filtering


def _not_found(service_id: str) -> NotFound:
    return NotFound(
        f"service {shown(service_id)} is not registered",
        reason="SERVICE_NOT_FOUND",
        metadata={"service_id": service_id},
    )


def _check_id(service_id: str, field: str = "service_id") -> None:
    if not SERVICE_ID.match(service_id):
        raise InvalidArgument(
            f"{field} {shown(service_id, 80)} is not a valid service id", violations=[(field, ID_RULE)]
        )


def _violations(service: registry_pb2.RegisteredService) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not SERVICE_ID.match(service.service_id):
        found.append(("service.service_id", ID_RULE))
    try:
        url = httpx.URL(service.endpoint)
        if url.scheme not in SCHEMES or not url.host or len(service.endpoint) > MAX_ENDPOINT:
            raise ValueError
        if url.scheme.startswith("grpc") and (url.port is None or url.path not in ("", "/")):
            found.append(("service.endpoint", "a gRPC endpoint is grpc://host:port (or grpcs://), without a path"))
    except (httpx.InvalidURL, ValueError):
        found.append(("service.endpoint", f"an http, https, grpc or grpcs URL of at most {MAX_ENDPOINT} characters"))
    if len(service.health_service) > 256:
        found.append(("service.health_service", "at most 256 characters"))
    for field, labels in (("capabilities", service.capabilities), ("compliance_zones", service.compliance_zones)):
        if len(labels) > MAX_LABELS:
            found.append((f"service.{field}", f"at most {MAX_LABELS}"))  # each is not looked at then
            continue
        found += [(f"service.{field}[{i}]", LABEL_RULE) for i, label in enumerate(labels) if not LABEL.match(label)]
    if service.provider and not LABEL.match(service.provider):
        found.append(("service.provider", LABEL_RULE))
    if service.health_path and (not service.health_path.startswith("/") or len(service.health_path) > 512):
        found.append(("service.health_path", "a path starting with '/', at most 512 characters"))
    if service.HasField("ttl") and not MIN_TTL_S <= service.ttl.ToNanoseconds() / 1e9 <= MAX_TTL_S:
        found.append(("service.ttl", f"between {MIN_TTL_S}s and {MAX_TTL_S}s"))
    if service.metadata.ByteSize() > MAX_METADATA_BYTES:
        found.append(("service.metadata", f"at most {MAX_METADATA_BYTES} bytes encoded"))
    return found


def _matches(service: registry_pb2.RegisteredService, request: registry_pb2.ListServicesRequest) -> bool:
    if not set(request.capabilities) <= set(service.capabilities):
        return False
    return not request.compliance_zone or request.compliance_zone in service.compliance_zones


class ServiceRegistryService(registry_pb2_grpc.ServiceRegistryServiceServicer):
    """The caller's tenant's registrations; another tenant's are NOT_FOUND."""

    def __init__(self, store: ServiceTables) -> None:
        self._store = store

    async def RegisterService(
        self, request: registry_pb2.RegisterServiceRequest, context: Context
    ) -> registry_pb2.RegisteredService:
        tenant = tenant_of(context)
        check_request_id(request.request_id)
        given = request.service
        violations = _violations(given)
        if violations:
            raise InvalidArgument(
                "service is not valid: " + "; ".join(f"{f} {d}" for f, d in violations), violations=violations
            )
        now = now_us()
        service = registry_pb2.RegisteredService()
        service.CopyFrom(given)
        clear_output_only(service)  # the registry's to set
        service.tenant = tenant
        service.create_time.CopyFrom(timestamp(now))
        if service.HasField("ttl"):
            service.expire_time.CopyFrom(timestamp(now + service.ttl.ToMicroseconds()))
        try:
            result = await self._store.register_service(
                tenant, service, idempotency_key(request.request_id, request), now
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to register another service") from None
        return registry_pb2.RegisteredService.FromString(result.response)

    async def GetService(
        self, request: registry_pb2.GetServiceRequest, context: Context
    ) -> registry_pb2.RegisteredService:
        _check_id(request.service_id)
        service = await self._store.get_service(tenant_of(context), request.service_id, now_us())
        if service is None:
            raise _not_found(request.service_id)
        return service

    async def ListServices(
        self, request: registry_pb2.ListServicesRequest, context: Context
    ) -> registry_pb2.ListServicesResponse:
        for i, label in enumerate(request.capabilities):
            if not LABEL.match(label):
                raise InvalidArgument(
                    "capabilities filter is not valid", violations=[(f"capabilities[{i}]", LABEL_RULE)]
                )
        for field, value in (("provider", request.provider), ("compliance_zone", request.compliance_zone)):
            if value and not LABEL.match(value):
                raise InvalidArgument(f"{field} filter is not valid", violations=[(field, LABEL_RULE)])
        size = pagination.page_size(request.page_size)
        filters = {
            "capabilities": ",".join(sorted(request.capabilities)),
            "provider": request.provider,
            "zone": request.compliance_zone,
        }
        after = pagination.cursor_str(pagination.decode_token(request.page_token, filters))
        tenant, now = tenant_of(context), now_us()
        kept: list[registry_pb2.RegisteredService] = []
        scanned = 0
        # Capabilities and zones are repeated fields, filtered here: read on
        # until a page (and one more, for the token) has passed the filters.
        # At least SCAN_BATCH rows a read: a page of one over a filter that few match was
        # thousands of reads of two rows.
        batch = max(size + 1, SCAN_BATCH)
        while len(kept) <= size and scanned < MAX_SCANNED:
            rows = await self._store.list_services(
                tenant, provider=request.provider, after=after, limit=batch, now_us=now
            )
            scanned += len(rows)
            kept += [row for row in rows if _matches(row, request)]
            if len(rows) < batch:
                break
            after = rows[-1].service_id
        services, token = pagination.page(kept, size, filters, lambda s: [s.service_id])
        return registry_pb2.ListServicesResponse(services=services, next_page_token=token)

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: Context
    ) -> registry_pb2.RegisteredService:
        _check_id(request.service_id)
        check_request_id(request.request_id)
        tenant, now = tenant_of(context), now_us()
        service = await self._store.get_service(tenant, request.service_id, now)
        if service is None:
            raise _not_found(request.service_id)
        if not service.HasField("ttl"):
            raise FailedPrecondition(
                f"service {shown(request.service_id)} has no TTL to renew", reason="SERVICE_HAS_NO_TTL"
            )
        service.expire_time.CopyFrom(timestamp(now + service.ttl.ToMicroseconds()))
        if not await self._store.save_service(tenant, service, now):
            raise _not_found(request.service_id)  # expired between the read and the write
        return service

    async def DeregisterService(
        self, request: registry_pb2.DeregisterServiceRequest, context: Context
    ) -> empty_pb2.Empty:
        _check_id(request.service_id)
        check_request_id(request.request_id)
        try:
            deleted = await self._store.deregister_service(
                tenant_of(context), request.service_id, now_us(), request.request_id
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to deregister another service") from None
        if not deleted:
            raise _not_found(request.service_id)
        return empty_pb2.Empty()
