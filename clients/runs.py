"""`run_workflow`: a workflow config (or an existing workflow's id) and inputs in, the finished execution out.

A config (a dict in the REST/Kailash shape, or a `Workflow`) is created
first (CreateWorkflow makes a new version of a workflow of that name); an
id runs that workflow's latest version. With `wait`, the call returns once
the execution has ended: the server waits up to its limit (300 s) within
CreateExecution, and a longer run is followed with `watch` until it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from flowport.clients.streams import FINISHED, awatch, watch
from flowport.v1 import execution_pb2, workflow_pb2

if TYPE_CHECKING:
    from flowport.clients.client import AsyncClient, Client

Workflow = str | dict[str, Any] | workflow_pb2.Workflow
SERVER_WAIT = 300.0


def _workflow(config: dict[str, Any] | workflow_pb2.Workflow) -> workflow_pb2.CreateWorkflowRequest:
    message = (
        config if isinstance(config, workflow_pb2.Workflow) else json_format.ParseDict(config, workflow_pb2.Workflow())
    )
    return workflow_pb2.CreateWorkflowRequest(workflow=message)


def _execution(workflow_id: str, version: int, inputs: dict[str, Any] | None, wait: bool, session_id: str) -> Any:
    request = execution_pb2.CreateExecutionRequest(
        workflow_id=workflow_id, workflow_version=version, wait=wait, session_id=session_id
    )
    request.inputs.update(inputs or {})
    if wait:
        request.wait_timeout.FromSeconds(int(SERVER_WAIT))
    return request


def run(client: Client, workflow: Workflow, inputs: dict[str, Any] | None, wait: bool, session_id: str) -> Any:
    """The sync implementation of `Client.run_workflow`."""
    workflow_id, version = workflow, 0
    if not isinstance(workflow, str):
        created = client.workflows.CreateWorkflow(_workflow(workflow))
        workflow_id, version = created.workflow_id, created.version
    assert isinstance(workflow_id, str)
    execution = client.executions.CreateExecution(_execution(workflow_id, version, inputs, wait, session_id))
    if wait and execution.state not in FINISHED:
        for _ in watch(client.executions.WatchExecution, execution.execution_id):
            pass
        execution = client.executions.GetExecution(
            execution_pb2.GetExecutionRequest(execution_id=execution.execution_id)
        )
    return execution


async def arun(
    client: AsyncClient, workflow: Workflow, inputs: dict[str, Any] | None, wait: bool, session_id: str
) -> Any:
    """The asyncio implementation of `AsyncClient.run_workflow`."""
    workflow_id, version = workflow, 0
    if not isinstance(workflow, str):
        created = await client.workflows.CreateWorkflow(_workflow(workflow))
        workflow_id, version = created.workflow_id, created.version
    assert isinstance(workflow_id, str)
    execution = await client.executions.CreateExecution(_execution(workflow_id, version, inputs, wait, session_id))
    if wait and execution.state not in FINISHED:
        async for _ in awatch(client.executions.WatchExecution, execution.execution_id):
            pass
        execution = await client.executions.GetExecution(
            execution_pb2.GetExecutionRequest(execution_id=execution.execution_id)
        )
    return execution
