"""WorkflowService: create (versioned), validate, get, list, delete."""

from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2, struct_pb2
from google.rpc import error_details_pb2

from flowport.server import pagination
from flowport.server.api.common import idempotency_key, request_id_reused, require
from flowport.server.api.sessions import (
    MAX_METADATA_BYTES,
    check_named_session,
    check_owner,
    check_session,
    session_scope,
)
from flowport.server.clock import now_us, timestamp
from flowport.server.engine.checks import WorkflowChecks
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.validation import stored_form, validate
from flowport.server.errors import InvalidArgument, NotFound, shown
from flowport.server.events.bus import EventBus
from flowport.server.storage import Deletion, IdempotencyConflict
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenancy import tenant_of
from flowport.server.types import Context
from flowport.v1 import workflow_pb2, workflow_pb2_grpc


def workflow_not_found(workflow_id: str, version: int = 0) -> NotFound:
    """NOT_FOUND for a workflow (or one version of it)."""
    what = f"workflow {shown(workflow_id)}" + (f" version {version}" if version else "")
    return NotFound(f"{what} does not exist", reason="WORKFLOW_NOT_FOUND", metadata={"workflow_id": workflow_id})


class WorkflowService(workflow_pb2_grpc.WorkflowServiceServicer):
    """Dynamic workflows in the seed's config format, versioned by name."""

    def __init__(self, store: SqlStore, registry: NodeRegistry, bus: EventBus, checks: WorkflowChecks) -> None:
        """`checks`: where large workflows are validated, off the event loop (engine/checks.py)."""
        self._store = store
        self._registry = registry
        self._bus = bus
        self._checks = checks

    async def CreateWorkflow(
        self, request: workflow_pb2.CreateWorkflowRequest, context: Context
    ) -> workflow_pb2.Workflow:
        given = request.workflow
        if request.session_id:  # Kailash clients name the session in the query string
            if given.session_id and given.session_id != request.session_id:
                raise InvalidArgument(
                    "session_id and workflow.session_id name different sessions",
                    reason="SESSION_MISMATCH",
                    violations=[("session_id", "must equal workflow.session_id when both are set")],
                )
            given.session_id = request.session_id
        key = idempotency_key(request.request_id, given)
        if given.metadata.ByteSize() > MAX_METADATA_BYTES:
            raise InvalidArgument(
                f"workflow.metadata must be at most {MAX_METADATA_BYTES} bytes encoded",
                violations=[("workflow.metadata", f"at most {MAX_METADATA_BYTES} bytes encoded")],
            )
        tenant = tenant_of(context)
        problems = await self._checks.run(tenant, given, lambda: validate(given, self._registry))
        if problems:
            raise InvalidArgument(
                f"workflow is not valid ({problems.total} problem{'s' if problems.total > 1 else ''}): "
                + "; ".join(f"{p}: {d}" for p, d in problems[:5]),
                reason="INVALID_WORKFLOW",
                violations=problems,
            )
        if given.session_id:
            await check_session(self._store, context, given.session_id)
        workflow = workflow_pb2.Workflow()
        workflow.CopyFrom(given)
        stored_form(workflow)
        workflow.tenant = tenant
        workflow.version = 0
        workflow.create_time.CopyFrom(timestamp(now_us()))
        try:
            result = await self._store.create_workflow(tenant, workflow, key)
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "with a different workflow") from None
        stored = workflow_pb2.Workflow.FromString(result.response)
        if not result.replayed:
            self._bus.publish(
                "workflow.created",
                tenant=tenant,
                session_id=stored.session_id,
                workflow_id=stored.workflow_id,
                data={"version": stored.version, "nodes": len(stored.nodes)},
            )
        return stored

    async def GetWorkflow(self, request: workflow_pb2.GetWorkflowRequest, context: Context) -> workflow_pb2.Workflow:
        require(request.workflow_id, "workflow_id")
        if request.version < 0:
            raise InvalidArgument("version must not be negative", violations=[("version", "must be >= 0")])
        if request.session_id:
            await check_named_session(self._store, context, request.session_id)
        # A version created in another credential's session is as missing as one never created.
        workflow = await self._store.get_workflow(
            tenant_of(context), request.workflow_id, request.version, session_creator=session_scope(context)
        )
        if workflow is None:
            raise workflow_not_found(request.workflow_id, request.version)
        return workflow

    async def ListWorkflows(
        self, request: workflow_pb2.ListWorkflowsRequest, context: Context
    ) -> workflow_pb2.ListWorkflowsResponse:
        size = pagination.page_size(request.page_size)
        filters = {"session_id": request.session_id}
        cursor = pagination.decode_token(request.page_token, filters)
        after = pagination.cursor_str(cursor)
        if request.session_id:
            await check_owner(self._store, context, request.session_id)
        tenant, creator = tenant_of(context), session_scope(context)
        rows, total = await asyncio.gather(
            self._store.list_workflows(
                tenant, session_id=request.session_id, after=after, limit=size + 1, session_creator=creator
            ),
            self._store.count_listed_workflows(tenant, session_id=request.session_id, session_creator=creator),
        )
        workflows, token = pagination.page(rows, size, filters, lambda w: [w.workflow_id])
        return workflow_pb2.ListWorkflowsResponse(workflows=workflows, next_page_token=token, total=total)

    async def GetWorkflowMap(self, request: workflow_pb2.GetWorkflowMapRequest, context: Context) -> struct_pb2.Struct:
        rows = await self._store.list_workflows(
            tenant_of(context),
            session_id="",
            after=None,
            limit=pagination.MAX_PAGE_SIZE,
            session_creator=session_scope(context),
        )
        return pagination.bounded_map(
            (
                w.workflow_id,
                {
                    "type": "embedded",  # it runs here; Kailash's other kind, "proxied", forwards elsewhere
                    "name": w.name,
                    "description": w.description,
                    "version": str(w.version),
                    "tags": [],
                    "endpoints": [f"/workflows/{w.workflow_id}/execute", f"/{w.workflow_id}/execute"],
                },
            )
            for w in rows
        )

    async def DeleteWorkflow(self, request: workflow_pb2.DeleteWorkflowRequest, context: Context) -> empty_pb2.Empty:
        require(request.workflow_id, "workflow_id")
        idempotency_key(request.request_id, request)  # validates the key's length
        tenant = tenant_of(context)
        try:
            deleted = await self._store.delete_workflow(
                tenant, request.workflow_id, now_us(), request.request_id, session_creator=session_scope(context)
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to delete another workflow") from None
        if not deleted.done:
            raise workflow_not_found(request.workflow_id)
        if deleted is Deletion.DELETED:  # a replay was announced the first time
            self._bus.publish("workflow.deleted", tenant=tenant, workflow_id=request.workflow_id)
        return empty_pb2.Empty()

    async def ValidateWorkflow(
        self, request: workflow_pb2.ValidateWorkflowRequest, context: Context
    ) -> workflow_pb2.ValidateWorkflowResponse:
        # At most MAX_PROBLEMS and a note counting the rest: the answer stays small whatever was sent.
        workflow = request.workflow
        problems = await self._checks.run(tenant_of(context), workflow, lambda: validate(workflow, self._registry))
        return workflow_pb2.ValidateWorkflowResponse(
            valid=not problems,
            errors=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in problems],
        )
