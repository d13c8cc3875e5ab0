"""Structured logs: JSON lines with the call's context (request id, tenant, rpc, execution id,
trace id), and no secret value, API key or token anywhere in a debug-level run that uses them."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowport.clients import AsyncClient
from flowport.clients.errors import ApiError
from flowport.server.app import start, stop
from flowport.server.observability import logs
from flowport.v1 import apikey_pb2, execution_pb2, secret_pb2, session_pb2

from ..conftest import ADMIN_KEY, make_settings

SECRET_VALUE = "s3cr3t-VALUE-that-must-never-be-logged"
WRONG_KEY = "fpk_wrong_0123456789abcdef0123456789abcdef"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"auth": self.headers.get("authorization", "")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    logs.configure("debug", "json", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before[0]:
            root.addHandler(handler)
        root.setLevel(before[1])


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_a_debug_run_logs_json_with_context_and_no_secrets(captured: io.StringIO, tmp_path: Path) -> None:
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, args=(0.05,), daemon=True).start()
    running = await start(make_settings(tmp_path / "data"))
    target = f"127.0.0.1:{running.port}"
    try:
        async with AsyncClient(target, api_key=ADMIN_KEY) as admin:
            made = await admin.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=["user"]))
            )
        user_key = made.key
        async with AsyncClient(target, api_key=user_key) as acme:
            await acme.secrets.PutSecret(secret_pb2.PutSecretRequest(name="PARTNER_TOKEN", value=SECRET_VALUE))
            await acme.sessions.CreateSession(
                session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="ada")),
                metadata=(("x-request-id", "req-logs-1"), ("traceparent", TRACEPARENT)),
            )
            workflow = {
                "name": "secretive",
                "nodes": [
                    {
                        "type": "HTTPRequestNode",
                        "name": "call",
                        "config": {
                            "url": f"http://127.0.0.1:{echo.server_port}/",
                            "headers": {"Authorization": "Bearer ${secret:PARTNER_TOKEN}"},
                        },
                    },
                    # A node that fails and says why: its message is logged, with its context.
                    {"type": "PythonCodeNode", "name": "boom", "config": {"code": "result = 1 / 0"}},
                ],
                "connections": [{"from_node": "call", "from_output": "response", "to_node": "boom", "to_input": "r"}],
            }
            done = await acme.run_workflow(workflow, {})
            assert done.state == execution_pb2.Execution.STATE_FAILED
        async with AsyncClient(target, api_key=WRONG_KEY, retries=1) as stranger:
            with pytest.raises(ApiError) as refused:
                await stranger.sessions.ListSessions(session_pb2.ListSessionsRequest())
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await stop(running, 1.0)
        echo.shutdown()
        echo.server_close()

    text = captured.getvalue()
    lines = _lines(captured)  # every line is one JSON object
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    # The key's secret part follows its id and a dot; it may itself hold "_" (base64url).
    for needle in (SECRET_VALUE, ADMIN_KEY, user_key, WRONG_KEY, user_key.split(".", 1)[-1]):
        assert needle not in text, f"{needle[:12]}… appears in the logs"

    calls = [line for line in lines if line.get("rpc") == "/flowport.v1.SessionService/CreateSession"]
    assert calls, "the call's debug line carries its method"
    assert {(c.get("request_id"), c.get("tenant"), c.get("trace_id")) for c in calls} == {
        ("req-logs-1", "acme", "4bf92f3577b34da6a3ce929d0e0e4736")
    }
    executions = [line for line in lines if line.get("execution_id") == done.execution_id]
    assert executions and all(line["tenant"] == "acme" for line in executions)
    refusals = [line for line in lines if line.get("rpc") == "/flowport.v1.SessionService/ListSessions"]
    assert refusals and all("tenant" not in line for line in refusals)


def test_text_format_appends_the_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("text", stream))
    handler.addFilter(logs.ContextFilter())
    record = logging.LogRecord("flowport.test", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    record.execution_id = "exe_1"
    handler.handle(record)
    assert stream.getvalue().rstrip().endswith("flowport.test: hello there [execution_id=exe_1]")
    # auto: JSON when not a terminal
    assert isinstance(logs.formatter("auto", io.StringIO()), type(logs.formatter("json", stream)))
