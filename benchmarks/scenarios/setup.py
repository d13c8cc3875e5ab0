"""What every flowport scenario needs first: a session, the trivial workflow, and the server's counters."""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from benchmarks.harness.targets import ADMIN_KEY, FlowportUp
from flowport.v1 import gateway_pb2, gateway_pb2_grpc, session_pb2, session_pb2_grpc, workflow_pb2, workflow_pb2_grpc

METADATA = (("x-api-key", ADMIN_KEY),)
HEADERS = {"x-api-key": ADMIN_KEY}
# One PythonCodeNode returning a small dict from an input `n`, as the Kailash peer registers it.
TRIVIAL = {
    "name": "trivial",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
}


def prepare(up: FlowportUp) -> session_pb2.Session:
    """Make a session and the trivial workflow; returns the session."""
    with grpc.insecure_channel(up.grpc_direct) as channel:
        session = session_pb2_grpc.SessionServiceStub(channel).CreateSession(
            session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="bench")),
            metadata=METADATA,
        )
        workflow = json_format.ParseDict(TRIVIAL, workflow_pb2.Workflow())
        workflow_pb2_grpc.WorkflowServiceStub(channel).CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(workflow=workflow), metadata=METADATA
        )
    return session


def stats(up: FlowportUp) -> gateway_pb2.Stats:
    """The server's own counters (requests and errors by its count, executions, streams)."""
    with grpc.insecure_channel(up.grpc_direct) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).GetStats(gateway_pb2.GetStatsRequest(), metadata=METADATA)
