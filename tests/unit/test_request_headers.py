"""Headers the HTTP client owns, through a whole server: a workflow whose HTTP node sets one is
refused when it is created or validated (INVALID_ARGUMENT, naming the header's field path). One
stored before the rule fails clearly when it would run: FAILED_PRECONDITION, naming the header."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from flowport.clients import AsyncClient
from flowport.clients.errors import ApiError
from flowport.server.app import Running, start, stop
from flowport.server.clock import now_us, timestamp
from flowport.server.engine.validation import stored_form
from flowport.v1 import schema_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start(make_settings(tmp_path / "data"))
    try:
        yield running
    finally:
        await stop(running, 1.0)


@pytest.fixture
async def admin(server: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as client:
        yield client


def _workflow(*configs: tuple[str, dict[str, Any]]) -> workflow_pb2.Workflow:
    nodes = [{"type": kind, "name": f"n{i}", "config": config} for i, (kind, config) in enumerate(configs)]
    return json_format.ParseDict({"name": "calls", "nodes": nodes}, workflow_pb2.Workflow())


SMUGGLING = _workflow(
    (
        "HTTPRequestNode",
        {"url": "https://api.example/x", "method": "POST", "headers": {"Transfer-Encoding": "chunked"}},
    ),
    ("RESTClientNode", {"base_url": "https://api.example", "default_headers": {"host": "internal.admin"}}),
    ("HTTPRequestNode", {"url": "https://api.example/x", "headers": {"X-Split": "a\r\nHost: internal.admin"}}),
    ("HTTPRequestNode", {"url": "https://api.example/x", "headers": {"Bad Name": "v"}}),
)
FIELDS = {
    "nodes[0].config.headers.Transfer-Encoding",
    "nodes[1].config.default_headers.host",
    "nodes[2].config.headers.X-Split",
    "nodes[3].config.headers",
}


async def test_create_refuses_with_each_headers_field_path(admin: AsyncClient) -> None:
    with pytest.raises(ApiError) as raised:
        await admin.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=SMUGGLING))
    error = raised.value
    assert (error.code(), error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_WORKFLOW")
    assert {field for field, _ in error.violations} == FIELDS
    assert "internal.admin" not in error.details() + str(error.violations)  # values are never quoted


async def test_validate_lists_the_same_problems(admin: AsyncClient) -> None:
    checked = await admin.workflows.ValidateWorkflow(workflow_pb2.ValidateWorkflowRequest(workflow=SMUGGLING))
    assert not checked.valid
    assert {error.field for error in checked.errors} == FIELDS


async def test_a_workflow_stored_before_the_rule_fails_clearly_when_it_runs(
    server: Running, admin: AsyncClient
) -> None:
    # Written to the store as an earlier release accepted it, without the check.
    stored = _workflow(("HTTPRequestNode", {"url": "https://api.example/x", "headers": {"Host": "internal.admin"}}))
    stored_form(stored)
    stored.tenant = "default"
    stored.create_time.CopyFrom(timestamp(now_us()))
    await server.store.create_workflow("default", stored, None)
    # Refused before it starts, naming what fails now and what to do.
    with pytest.raises(ApiError) as caught:
        await admin.run_workflow(stored.workflow_id)
    error = caught.value
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and error.reason == "WORKFLOW_VERSION_INVALID"
    assert ("nodes[0].config.headers.Host" in error.message) and "create a new version" in error.message
    assert [field for field, _ in error.violations] == ["nodes[0].config.headers.Host"]
    assert "internal.admin" not in error.message
    # Its schema says the same, rather than failing inside.
    with pytest.raises(ApiError) as schema:
        await admin.schemas.GetWorkflowSchema(schema_pb2.GetWorkflowSchemaRequest(workflow_id=stored.workflow_id))
    assert schema.value.reason == "WORKFLOW_VERSION_INVALID"
