"""Durability: kill -9 the server in the middle of an execution and start it
again. Retry-safe work resumes after the last finished node; a node that is
not safe to rerun is never run twice: its execution fails as INTERRUPTED."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from google.protobuf import json_format

from flowport.clients import Client
from flowport.v1 import execution_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings
from ..conftest import ServeProcess as Server

pytestmark = pytest.mark.integration
Execution = execution_pb2.Execution
NodeRun = execution_pb2.NodeRun


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(make_settings(tmp_path / "data"))
    running.start()
    yield running
    running.stop()


def _workflow(client: Client, data: dict[str, Any]) -> None:
    client.workflows.CreateWorkflow(
        workflow_pb2.CreateWorkflowRequest(workflow=json_format.ParseDict(data, workflow_pb2.Workflow()))
    )


def _poll(client: Client, execution_id: str, until: Any, timeout: float = 30) -> Execution:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        execution = client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=execution_id))
        if until(execution):
            return execution
        time.sleep(0.05)
    raise AssertionError(f"execution never reached the expected state: {execution}")


def _runs(execution: Execution) -> dict[str, NodeRun]:
    return {run.node_id: run for run in execution.node_runs}


def test_a_killed_server_resumes_retry_safe_work_without_rerunning_finished_nodes(server: Server) -> None:
    with Client(server.settings.grpc_target, api_key=ADMIN_KEY) as client:
        _workflow(
            client,
            {
                "name": "slow_chain",
                "nodes": [
                    {"type": "PythonCodeNode", "name": "first", "config": {"code": "result = {'n': n + 1}"}},
                    {
                        "type": "PythonCodeNode",
                        "name": "slow",
                        "config": {"code": "import time\ntime.sleep(1.5)\nresult = {'n': data['n'] * 10}"},
                    },
                ],
                "connections": [{"from_node": "first", "from_output": "result", "to_node": "slow", "to_input": "data"}],
            },
        )
        request = execution_pb2.CreateExecutionRequest(workflow_id="slow_chain")
        request.inputs.update({"n": 1})
        started = client.executions.CreateExecution(request)
        before = _poll(client, started.execution_id, lambda e: "slow" in _runs(e))
        first_run = _runs(before)["first"]
        assert first_run.state == NodeRun.STATE_SUCCEEDED
    server.kill()
    server.start()
    with Client(server.settings.grpc_target, api_key=ADMIN_KEY) as client:
        done = _poll(
            client, started.execution_id, lambda e: e.state not in (Execution.STATE_PENDING, Execution.STATE_RUNNING)
        )
    assert done.state == Execution.STATE_SUCCEEDED, done.error.message
    assert json_format.MessageToDict(done.outputs)["slow"] == {"result": {"n": 20.0}}
    assert _runs(done)["first"].start_time == first_run.start_time, "the finished node was not run again"
    assert [run.node_id for run in done.node_runs].count("first") == 1


class _Hanging(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.hits.append(self.path)
        time.sleep(5)  # long enough for the server to be killed meanwhile
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_node_that_is_not_safe_to_rerun_fails_as_interrupted_and_runs_once(server: Server) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Hanging)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/charge"
    try:
        with Client(server.settings.grpc_target, api_key=ADMIN_KEY) as client:
            _workflow(
                client,
                {
                    "name": "charge_card",
                    "nodes": [
                        {
                            "type": "HTTPRequestNode",
                            "name": "charge",
                            "config": {"url": url, "method": "POST", "body": {"amount": 5}},
                        }
                    ],
                },
            )
            started = client.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="charge_card"))
            _poll(client, started.execution_id, lambda e: bool(_Hanging.hits))
        server.kill()
        server.start()
        with Client(server.settings.grpc_target, api_key=ADMIN_KEY) as client:
            done = _poll(client, started.execution_id, lambda e: e.state == Execution.STATE_FAILED)
        assert "interrupted" in done.error.message and "'charge'" in done.error.message
        info = json.loads(json_format.MessageToJson(done.error))["details"][0]
        assert info["reason"] == "INTERRUPTED"
        # A rerun would have POSTed again, then succeeded instead of failing.
        assert _Hanging.hits == ["/charge"], "the POST must never be sent twice"
    finally:
        receiver.shutdown()
