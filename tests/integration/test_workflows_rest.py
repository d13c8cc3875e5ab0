"""Workflows, executions and schemas over REST through a real Envoy, with
nodes that reach real local services on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from ..conftest import ADMIN_HEADERS, Stack
from ..unit.test_validation import SEED_PIPELINE

pytestmark = pytest.mark.integration

BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


class _Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"items": [1, 2, 3], "external_id": "x-1"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http, timeout=30, headers=ADMIN_HEADERS) as client:
        yield client


def create(http: httpx.Client, workflow: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/api/workflows", json=workflow)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_seed_pipeline_runs_against_a_local_api(http: httpx.Client, api: str) -> None:
    pipeline = json.loads(json.dumps(SEED_PIPELINE))
    pipeline["name"] = "seed_pipeline_rest"
    pipeline["nodes"][0]["config"]["url"] = f"{api}/data"
    created = create(http, pipeline)
    assert created["workflow_id"] == "seed_pipeline_rest" and created["version"] == 1
    response = http.post("/api/executions", json={"workflow_id": "seed_pipeline_rest", "wait": True})
    assert response.status_code == 200, response.text
    execution = response.json()
    assert execution["state"] == "STATE_SUCCEEDED", execution["error"]
    processed = execution["outputs"]["process_data"]["result"]
    # len() of the response object: status_code, headers, body, json, url, attempts
    assert processed["processed"] == 6
    assert "T" in processed["timestamp"]
    assert execution["outputs"]["fetch_data"]["response"]["json"]["items"] == [1, 2, 3]


def test_two_python_nodes_chain_like_the_seed(http: httpx.Client) -> None:
    create(
        http,
        {
            "name": "python_chain",
            "nodes": [
                {
                    "type": "PythonCodeNode",
                    "name": "validate",
                    "config": {"code": "result = {'user_id': user_id, 'ok': True}"},
                },
                {
                    "type": "PythonCodeNode",
                    "name": "greet",
                    "config": {"code": "result = {'hello': data['user_id'], 'n': n * 2}"},
                },
            ],
            "connections": [{"from_node": "validate", "from_output": "result", "to_node": "greet", "to_input": "data"}],
        },
    )
    execution = http.post(
        "/api/executions", json={"workflow_id": "python_chain", "inputs": {"user_id": "ada", "n": 21}, "wait": True}
    ).json()
    assert execution["state"] == "STATE_SUCCEEDED", execution["error"]
    assert execution["outputs"]["greet"]["result"] == {"hello": "ada", "n": 42}


def test_kailash_execute_path_waits_and_returns_outputs_by_node(http: httpx.Client) -> None:
    create(
        http,
        {
            "name": "trivial",
            "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
        },
    )
    response = http.post("/workflows/trivial/execute", json={"inputs": {"n": 1}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "STATE_SUCCEEDED"
    assert body["outputs"] == {"calc": {"result": {"n": 2}}}


def test_invalid_workflow_is_400_with_every_violation(http: httpx.Client) -> None:
    response = http.post(
        "/api/workflows",
        json={"name": "broken", "nodes": [{"type": "HTTPRequestNode", "name": "a"}, {"type": "Nope", "name": "a"}]},
    )
    assert response.status_code == 400
    details = next(d for d in response.json()["details"] if d["@type"] == BAD_REQUEST)
    fields = {v["field"] for v in details["field_violations"]}
    assert {"nodes[0].config.url", "nodes[1].name", "nodes[1].type"} <= fields


def test_validate_returns_problems_without_creating(http: httpx.Client) -> None:
    response = http.post(
        "/api/workflows:validate", json={"name": "never_created", "nodes": [{"type": "Nope", "name": "x"}]}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False and body["errors"][0]["field"] == "nodes[0].type"
    assert http.get("/api/workflows/never_created").status_code == 404
    ok = http.post("/api/workflows:validate", json=SEED_PIPELINE).json()
    assert ok == {"valid": True, "errors": []}


def test_versions_list_get_and_delete(http: httpx.Client) -> None:
    first = create(
        http,
        {"name": "versioned", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}}]},
    )
    second = create(
        http,
        {"name": "versioned", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 2"}}]},
    )
    assert (first["version"], second["version"]) == (1, 2)
    assert http.get("/api/workflows/versioned").json()["version"] == 2
    assert (
        http.get("/api/workflows/versioned", params={"version": 1}).json()["nodes"][0]["config"]["code"] == "result = 1"
    )
    names = [w["workflow_id"] for w in http.get("/api/workflows", params={"page_size": 1000}).json()["workflows"]]
    assert names.count("versioned") == 1
    run = http.post("/api/executions", json={"workflow_id": "versioned", "wait": True}).json()
    assert run["workflow_version"] == 2 and run["outputs"]["a"]["result"] == 2
    assert http.delete("/api/workflows/versioned").status_code == 200
    assert http.get("/api/workflows/versioned").status_code == 404
    assert http.get(f"/api/executions/{run['execution_id']}").status_code == 200, "executions outlive their workflow"


def test_idempotent_execution_over_rest(http: httpx.Client) -> None:
    create(http, {"name": "idem", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = n"}}]})
    body = {"workflow_id": "idem", "inputs": {"n": 7}, "request_id": "idem-1", "wait": True}
    first = http.post("/api/executions", json=body).json()
    again = http.post("/api/executions", json=body).json()
    assert first["execution_id"] == again["execution_id"]
    listed = http.get("/api/executions", params={"workflow_id": "idem"}).json()["executions"]
    assert len(listed) == 1, "a replay must not run the workflow again"
    conflict = http.post("/api/executions", json={**body, "inputs": {"n": 8}})
    assert conflict.status_code == 409


def test_cancel_over_rest_stops_user_code(http: httpx.Client) -> None:
    create(
        http,
        {
            "name": "spin",
            "nodes": [{"type": "PythonCodeNode", "name": "loop", "config": {"code": "while True:\n    pass"}}],
        },
    )
    started = http.post("/api/executions", json={"workflow_id": "spin"}).json()
    assert started["state"] in ("STATE_PENDING", "STATE_RUNNING")
    cancelled = http.post(f"/api/executions/{started['execution_id']}:cancel", json={})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "STATE_CANCELLED"
    after = http.post("/api/executions", json={"workflow_id": "trivial_after_cancel_missing"})
    assert after.status_code == 404
    create(
        http,
        {
            "name": "after_cancel",
            "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 'ok'"}}],
        },
    )
    ok = http.post("/api/executions", json={"workflow_id": "after_cancel", "wait": True}).json()
    assert ok["state"] == "STATE_SUCCEEDED", "the sandbox pool recovered from the cancelled worker"


def test_failed_execution_names_the_node(http: httpx.Client) -> None:
    create(
        http,
        {"name": "boom", "nodes": [{"type": "PythonCodeNode", "name": "divide", "config": {"code": "result = 1 / 0"}}]},
    )
    execution = http.post("/api/executions", json={"workflow_id": "boom", "wait": True}).json()
    assert execution["state"] == "STATE_FAILED"
    assert "divide" in execution["error"]["message"] and "ZeroDivisionError" in execution["error"]["message"]
    run = execution["node_runs"][0]
    assert run["state"] == "STATE_FAILED" and run["error"]["message"]


def test_schemas(http: httpx.Client) -> None:
    nodes = http.get("/api/schemas/nodes").json()["node_schemas"]
    names = {n["node_type"] for n in nodes}
    assert {
        "PythonCodeNode",
        "HTTPRequestNode",
        "RESTClientNode",
        "SQLDatabaseNode",
        "AsyncSQLDatabaseNode",
        "SwitchNode",
        "MergeNode",
        "TransformNode",
    } <= names
    http_node = http.get("/api/schemas/nodes/HTTPRequestNode").json()
    # A URL, or a named HTTP resource whose base_url it is resolved against.
    assert http_node["config_schema"]["anyOf"] == [{"required": ["url"]}, {"required": ["resource_name"]}]
    # `result` is read from `response` on a connection; the outputs hold `response` alone.
    assert http_node["outputs_schema"]["x-connection-aliases"] == {"result": "response"}
    assert set(http_node["outputs_schema"]["properties"]) == {"response", "status_code", "success"}
    assert http.get("/api/schemas/nodes/TeleportNode").status_code == 404
    create(http, {"name": "needs_n", "nodes": [{"type": "SwitchNode", "name": "s", "config": {"operator": "truthy"}}]})
    schema = http.get("/api/schemas/workflows/needs_n").json()
    assert schema["inputs_schema"]["required"] == ["input_data"]
    assert "s" in schema["outputs_schema"]["properties"]
    missing = http.post("/api/executions", json={"workflow_id": "needs_n"})
    assert missing.status_code == 400 and "input_data" in missing.text
    create(
        http,
        {"name": "uses_n", "nodes": [{"type": "PythonCodeNode", "name": "c", "config": {"code": "result = n + 1"}}]},
    )
    assert http.get("/api/schemas/workflows/uses_n").json()["inputs_schema"]["required"] == ["n"]
    no_n = http.post("/api/executions", json={"workflow_id": "uses_n"})
    assert no_n.status_code == 400
    violation = next(d for d in no_n.json()["details"] if d["@type"] == BAD_REQUEST)["field_violations"][0]
    assert violation["field"] == "inputs.n"


def test_a_config_reference_is_a_required_input_and_code_knows_its_tenant(http: httpx.Client) -> None:
    headers = {"Authorization": "Bearer ${api_token}", "X-Tenant": "${tenant_id}"}
    node = {"type": "HTTPRequestNode", "id": "h", "config": {"url": "http://127.0.0.1:9/data", "headers": headers}}
    create(http, {"name": "hdr_only", "nodes": [node]})
    assert http.get("/api/schemas/workflows/hdr_only").json()["inputs_schema"]["required"] == ["api_token"]
    refused = http.post("/api/executions", json={"workflow_id": "hdr_only", "wait": True})
    assert refused.status_code == 400, refused.text
    violation = next(d for d in refused.json()["details"] if d["@type"] == BAD_REQUEST)["field_violations"][0]
    assert violation["field"] == "inputs.api_token"
    # `tenant_id` in code is the execution's tenant, as `${tenant_id}` is in configs: not an input.
    code = {"type": "PythonCodeNode", "name": "c", "config": {"code": "result = {'t': tenant_id}"}}
    create(http, {"name": "code_tenant", "nodes": [code]})
    assert http.get("/api/schemas/workflows/code_tenant").json()["inputs_schema"]["required"] == []
    for given in ({}, {"tenant_id": "evil"}, {"c": {"tenant_id": "evil"}}):
        execution = http.post(
            "/api/executions", json={"workflow_id": "code_tenant", "inputs": given, "wait": True}
        ).json()
        assert execution["state"] == "STATE_SUCCEEDED", execution
        assert execution["outputs"]["c"]["result"] == {"t": "default"}


HOSTILE = {
    "reads_passwd": ("result = open('/etc/passwd').read()", "SANDBOX_POLICY"),
    "writes_file": ("f = open('/tmp/flowport-sandbox-probe', 'w')\nf.write('x')\nresult = 1", "SANDBOX_POLICY"),
    "opens_socket": ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\nresult = 1", "SANDBOX_POLICY"),
    "spawns_process": ("import subprocess\nresult = subprocess.run(['true'])", "SANDBOX_POLICY"),
    "imports_ctypes": ("import ctypes\nresult = 1", "SANDBOX_POLICY"),
    "loops_forever": ("while True:\n    pass", "TIMEOUT"),
    "allocates_2gib": ("x = bytearray(2 * 1024**3)\nresult = len(x)", "SANDBOX_MEMORY"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_user_code_fails_clearly_and_the_server_stays_healthy(http: httpx.Client, case: str) -> None:
    code, reason = HOSTILE[case]
    name = f"hostile_{case}"
    node: dict[str, Any] = {"type": "PythonCodeNode", "name": "user", "config": {"code": code}, "timeout": "3s"}
    create(http, {"name": name, "nodes": [node]})
    execution = http.post("/api/executions", json={"workflow_id": name, "wait": True}).json()
    assert execution["state"] == "STATE_FAILED"
    error = execution["error"]
    assert reason in error["details"][0]["reason"], error
    assert "'user'" in error["message"]
    # The worker that ran the code is replaced; the gateway is healthy again at once or within moments.
    deadline = time.monotonic() + 10
    while http.get("/health").json()["status"] != "healthy":
        assert time.monotonic() < deadline, "the server did not return to healthy"
        time.sleep(0.1)
    create(
        http,
        {
            "name": f"after_{case}",
            "nodes": [{"type": "PythonCodeNode", "name": "ok", "config": {"code": "result = n + 1"}}],
        },
    )
    after = http.post("/api/executions", json={"workflow_id": f"after_{case}", "inputs": {"n": 1}, "wait": True}).json()
    assert after["state"] == "STATE_SUCCEEDED" and after["outputs"]["ok"]["result"] == 2


def test_the_seed_sql_example_runs_against_a_sqlite_file(http: httpx.Client, stack: Stack) -> None:
    import sqlite3

    # An operator's file for the tenant: in its own folder, named by the workflow as sqlite:///enterprise.db.
    folder = stack.settings.sqlite_root / "default"
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "enterprise.db"
    db.unlink(missing_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE enterprise_records (id INTEGER, name TEXT, status TEXT, tenant_id TEXT, created_at TEXT)"
        )
        conn.executemany(
            "INSERT INTO enterprise_records VALUES (?, ?, ?, ?, ?)",
            [
                (1, "alpha", "active", "default", "2024-01-01T10:00:00"),
                (2, "beta", "inactive", "default", "2024-01-02T10:00:00"),
                (3, "gamma", "active", "default", "2024-01-03T10:00:00"),
                (4, "delta", "active", "acme", "2024-01-04T10:00:00"),
            ],
        )
    create(
        http,
        {
            "name": "seed_db_workflow",
            "nodes": [
                {
                    "type": "AsyncSQLDatabaseNode",
                    "name": "enterprise_db",
                    "config": {
                        "connection_string": "sqlite:///enterprise.db",
                        "pool_size": 5,
                        "query": "SELECT id, name, status, tenant_id, created_at FROM enterprise_records "
                        "WHERE tenant_id = :tenant_id AND status = :status ORDER BY created_at DESC LIMIT :limit",
                        "query_params": {"tenant_id": "${tenant_id}", "status": "active", "limit": 100},
                    },
                },
                {
                    "type": "PythonCodeNode",
                    "name": "process_db_results",
                    # The seed calls .isoformat() on datetimes; rows arrive as JSON, dates as ISO strings.
                    "config": {
                        "code": "records = [{'id': r['id'], 'name': r['name'], 'created_at': r['created_at']} "
                        "for r in db_results['rows']]\n"
                        "result = {'records': records, 'count': len(records), "
                        "'tenant_id': db_results['rows'][0]['tenant_id'] if records else None}"
                    },
                },
            ],
            "connections": [
                {
                    "from_node": "enterprise_db",
                    "from_output": "result",
                    "to_node": "process_db_results",
                    "to_input": "db_results",
                }
            ],
        },
    )
    # ${tenant_id} is the execution's tenant: an input of that name cannot pose as another.
    execution = http.post(
        "/api/executions", json={"workflow_id": "seed_db_workflow", "inputs": {"tenant_id": "acme"}, "wait": True}
    ).json()
    assert execution["state"] == "STATE_SUCCEEDED", execution["error"]
    result = execution["outputs"]["process_db_results"]["result"]
    assert result["count"] == 2 and result["tenant_id"] == "default"
    assert [r["name"] for r in result["records"]] == ["gamma", "alpha"]


def test_stats_count_executions(http: httpx.Client) -> None:
    create(
        http, {"name": "counted", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}}]}
    )
    assert (
        http.post("/api/executions", json={"workflow_id": "counted", "wait": True}).json()["state"] == "STATE_SUCCEEDED"
    )
    executions = http.get("/api/stats").json()["executions"]
    assert int(executions["started"]) >= 1 and int(executions["succeeded"]) >= 1
    assert executions["latency_p99"] >= executions["latency_p50"] > 0


def test_list_executions_filters_and_pages(http: httpx.Client) -> None:
    create(
        http,
        {"name": "listed", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1 / n"}}]},
    )
    session = http.post("/api/sessions", json={"user_id": "lister"}).json()["session_id"]
    ids = set()
    for n in (1, 2, 0):  # n == 0 fails
        body = {"workflow_id": "listed", "inputs": {"n": n}, "session_id": session, "wait": True}
        ids.add(http.post("/api/executions", json=body).json()["execution_id"])
    seen: list[str] = []
    token = ""
    while True:
        page = http.get("/api/executions", params={"session_id": session, "page_size": 2, "page_token": token}).json()
        seen += [e["execution_id"] for e in page["executions"]]
        token = page["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(ids)
    failed = http.get("/api/executions", params={"session_id": session, "state": "STATE_FAILED"}).json()["executions"]
    assert len(failed) == 1 and failed[0]["inputs"] == {"n": 0}
    unknown_session = http.post("/api/executions", json={"workflow_id": "listed", "session_id": "ses_nope"})
    assert unknown_session.status_code == 404


class _Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_receives_a_signed_execution_event(http: httpx.Client) -> None:
    from flowport.clients.webhooks import verify_signature

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    secret = "a-webhook-secret-of-32-bytes-ok!"
    try:
        hook = http.post(
            "/api/webhooks",
            json={
                "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                "event_types": ["execution.completed"],
                "secret": secret,
                "headers": {"Authorization": "Bearer receiver-token"},
            },
        )
        assert hook.status_code == 200, hook.text
        assert "secret" not in hook.json() or hook.json()["secret"] == "", "the secret is write-only"
        assert hook.json()["has_secret"] is True
        create(
            http,
            {"name": "hooked", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 7"}}]},
        )
        execution = http.post("/api/executions", json={"workflow_id": "hooked", "wait": True}).json()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            json.loads(body)["execution_id"] == execution["execution_id"] for _, body in _Hooks.received
        ):
            time.sleep(0.1)
        headers, body = next(
            (h, b) for h, b in _Hooks.received if json.loads(b)["execution_id"] == execution["execution_id"]
        )
        assert json.loads(body)["type"] == "execution.completed"
        assert verify_signature(secret, headers["X-Flowport-Signature"], body)
        assert secret not in headers["X-Flowport-Signature"]
        assert headers["Authorization"] == "Bearer receiver-token"
        deliveries = http.get(f"/api/webhooks/{hook.json()['webhook_id']}/deliveries").json()["deliveries"]
        assert any(d["state"] == "STATE_SUCCEEDED" and d["attempts"] == 1 for d in deliveries)
    finally:
        receiver.shutdown()
