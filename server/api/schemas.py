"""SchemaService: node types and workflow interfaces as JSON Schema."""

from __future__ import annotations

from google.protobuf import json_format

from flowport.server import pagination
from flowport.server.api.sessions import check_named_session, session_scope
from flowport.server.api.workflows import workflow_not_found
from flowport.server.engine.plan import PlanCache
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.values import python_to_struct
from flowport.server.errors import InvalidArgument, NotFound, shown
from flowport.server.nodes.base import NodeType
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenancy import tenant_of
from flowport.server.types import Context
from flowport.v1 import schema_pb2, schema_pb2_grpc


def node_schema(node_type: NodeType) -> schema_pb2.NodeSchema:
    """The NodeSchema message describing `node_type`."""
    return schema_pb2.NodeSchema(
        node_type=node_type.type_name,
        description=node_type.description,
        category=node_type.category,
        config_schema=python_to_struct(node_type.config_schema),
        inputs_schema=python_to_struct(node_type.inputs_schema),
        outputs_schema=python_to_struct(_with_aliases(node_type)),
        retry_safe=node_type.retry_safe,
    )


def _with_aliases(node_type: NodeType) -> dict[str, object]:
    """The outputs' schema, naming the other names a connection may read them by (stored once,
    so the execution's outputs hold none of them)."""
    if not node_type.output_aliases:
        return dict(node_type.outputs_schema)
    return {**node_type.outputs_schema, "x-connection-aliases": dict(node_type.output_aliases)}


class SchemaService(schema_pb2_grpc.SchemaServiceServicer):
    """Schema discovery for clients that build workflows."""

    def __init__(self, store: SqlStore, registry: NodeRegistry, plans: PlanCache) -> None:
        self._store = store
        self._registry = registry
        self._plans = plans
        # Node types are fixed for the process's life: build their messages once.
        self._schemas = {}
        for name in registry.names():
            node_type = registry.get(name)
            assert node_type is not None
            self._schemas[name] = node_schema(node_type)

    async def ListNodeSchemas(
        self, request: schema_pb2.ListNodeSchemasRequest, context: Context
    ) -> schema_pb2.ListNodeSchemasResponse:
        size = pagination.page_size(request.page_size)
        after = pagination.cursor_str(pagination.decode_token(request.page_token, {}))
        names = [n for n in sorted(self._schemas) if after is None or n > after][: size + 1]
        shown, token = pagination.page(names, size, {}, lambda n: [n])
        return schema_pb2.ListNodeSchemasResponse(
            node_schemas=[self._schemas[n] for n in shown], next_page_token=token, total=len(self._schemas)
        )

    async def GetNodeSchema(self, request: schema_pb2.GetNodeSchemaRequest, context: Context) -> schema_pb2.NodeSchema:
        found = self._schemas.get(request.node_type)
        if found is None:
            raise NotFound(
                f"node type {shown(request.node_type)} does not exist; known types: {', '.join(sorted(self._schemas))}",
                reason="NODE_TYPE_NOT_FOUND",
                metadata={"node_type": request.node_type},
            )
        schema = schema_pb2.NodeSchema()
        schema.CopyFrom(found)
        # Kailash's one-object `schema`; only here, so list pages stay half the size.
        schema.schema.update(
            {
                "parameters": json_format.MessageToDict(found.config_schema),
                "inputs": json_format.MessageToDict(found.inputs_schema),
                "outputs": json_format.MessageToDict(found.outputs_schema),
                "category": found.category,
            }
        )
        return schema

    async def GetWorkflowSchema(
        self, request: schema_pb2.GetWorkflowSchemaRequest, context: Context
    ) -> schema_pb2.WorkflowSchema:
        if request.version < 0:
            raise InvalidArgument("version must not be negative", violations=[("version", "must be >= 0")])
        if request.session_id:
            await check_named_session(self._store, context, request.session_id)
        tenant = tenant_of(context)
        workflow = await self._store.get_workflow(
            tenant, request.workflow_id, request.version, session_creator=session_scope(context)
        )
        if workflow is None:
            raise workflow_not_found(request.workflow_id, request.version)
        plan = await self._plans.runnable(tenant, workflow)
        return schema_pb2.WorkflowSchema(
            workflow_id=workflow.workflow_id,
            version=workflow.version,
            inputs_schema=python_to_struct(plan.inputs_schema),
            outputs_schema=python_to_struct(plan.outputs_schema()),
        )
