"""ResourceService: a tenant's named database pools and HTTP client profiles.

Nodes name a resource (`resource_name`) and get its shared pool or profile
(server/resources/directory.py); what makes a resource valid is in
server/resources/spec.py. A change or deletion through this process closes
its pool here at once; other processes notice within the directory's TTL
(or the pool health sweep, for deletions).
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from flowport.server import pagination
from flowport.server.api.common import check_request_id, clear_output_only, idempotency_key, request_id_reused
from flowport.server.clock import now_us, timestamp
from flowport.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, shown
from flowport.server.resources import spec
from flowport.server.resources.directory import ResourceDirectory
from flowport.server.storage import IdempotencyConflict
from flowport.server.storage.resources import ResourceExists, ResourceTables
from flowport.server.tenancy import tenant_of
from flowport.server.types import Context
from flowport.v1 import resource_pb2, resource_pb2_grpc


def _not_found(name: str) -> NotFound:
    return NotFound(f"resource {shown(name)} does not exist", reason="RESOURCE_NOT_FOUND", metadata={"name": name})


def _check_name(name: str) -> None:
    if not spec.NAME.match(name):
        raise InvalidArgument(
            f"name {shown(name, 80)} is not a valid resource name", violations=[("name", spec.NAME_RULE)]
        )


def _checked(given: resource_pb2.Resource, tenant: str) -> resource_pb2.Resource:
    """A copy of `given` with defaults filled in and output-only fields cleared; INVALID_ARGUMENT when bad."""
    resource = resource_pb2.Resource()
    resource.CopyFrom(given)
    violations = spec.check(resource)
    if violations:
        raise InvalidArgument(
            "resource is not valid: " + "; ".join(f"{f} {d}" for f, d in violations), violations=violations
        )
    clear_output_only(resource)
    resource.tenant = tenant
    return resource


class ResourceService(resource_pb2_grpc.ResourceServiceServicer):
    """The caller's tenant's resources; another tenant's are NOT_FOUND."""

    def __init__(self, store: ResourceTables, directory: ResourceDirectory | None = None) -> None:
        self._store = store
        self._directory = directory

    async def CreateResource(
        self, request: resource_pb2.CreateResourceRequest, context: Context
    ) -> resource_pb2.Resource:
        tenant = tenant_of(context)
        check_request_id(request.request_id)
        resource = _checked(request.resource, tenant)
        now = now_us()
        resource.create_time.CopyFrom(timestamp(now))
        resource.update_time.CopyFrom(timestamp(now))
        try:
            result = await self._store.create_resource(
                tenant, resource, idempotency_key(request.request_id, request), now
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to create another resource") from None
        except ResourceExists:
            raise AlreadyExists(
                f"resource {shown(resource.name)} already exists: change it with PUT /api/resources/{resource.name}",
                reason="RESOURCE_EXISTS",
                metadata={"name": resource.name},
            ) from None
        return resource_pb2.Resource.FromString(result.response)

    async def GetResource(self, request: resource_pb2.GetResourceRequest, context: Context) -> resource_pb2.Resource:
        _check_name(request.name)
        resource = await self._store.get_resource(tenant_of(context), request.name)
        if resource is None:
            raise _not_found(request.name)
        return resource

    async def ListResources(
        self, request: resource_pb2.ListResourcesRequest, context: Context
    ) -> resource_pb2.ListResourcesResponse:
        size = pagination.page_size(request.page_size)
        after = pagination.cursor_str(pagination.decode_token(request.page_token, {}))
        rows = await self._store.list_resources(tenant_of(context), after=after, limit=size + 1)
        resources, token = pagination.page(rows, size, {}, lambda r: [r.name])
        return resource_pb2.ListResourcesResponse(resources=resources, next_page_token=token)

    async def UpdateResource(
        self, request: resource_pb2.UpdateResourceRequest, context: Context
    ) -> resource_pb2.Resource:
        _check_name(request.name)
        check_request_id(request.request_id)
        if request.resource.name and request.resource.name != request.name:
            raise InvalidArgument(
                f"resource.name {shown(request.resource.name, 80)} differs from the name in the path "
                f"{shown(request.name, 80)}",
                violations=[("resource.name", "must equal name (a resource cannot be renamed)")],
            )
        given = resource_pb2.Resource()
        given.CopyFrom(request.resource)
        given.name = request.name
        tenant = tenant_of(context)
        resource = _checked(given, tenant)
        before = await self._store.get_resource(tenant, request.name)
        if before is None:
            raise _not_found(request.name)
        if before.WhichOneof("kind") != resource.WhichOneof("kind"):
            raise FailedPrecondition(
                f"resource {shown(request.name)} is a {before.WhichOneof('kind')} resource; its kind cannot change "
                "(delete it and create it again)",
                reason="RESOURCE_KIND_CHANGED",
            )
        now = now_us()
        resource.update_time.CopyFrom(timestamp(now))
        replaced = await self._store.replace_resource(tenant, resource, now)
        if replaced is None:
            raise _not_found(request.name)  # deleted between the read and the write
        if self._directory is not None:
            self._directory.forget(tenant, request.name)
        return replaced

    async def DeleteResource(self, request: resource_pb2.DeleteResourceRequest, context: Context) -> empty_pb2.Empty:
        _check_name(request.name)
        check_request_id(request.request_id)
        tenant = tenant_of(context)
        try:
            deleted = await self._store.delete_resource(tenant, request.name, now_us(), request.request_id)
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to delete another resource") from None
        if not deleted:
            raise _not_found(request.name)
        if self._directory is not None:
            self._directory.forget(tenant, request.name)
        return empty_pb2.Empty()
