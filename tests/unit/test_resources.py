"""ResourceService and the nodes that name resources: CRUD and refusals, SQL nodes on a
tenant's shared pool (50 concurrent executions never open more connections than the
pool's size, on a real PostgreSQL), secrets filled into connection strings, pools
closed when their resource goes, the settings file, and GET /health's pool component."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2

from flowport.clients import AsyncClient
from flowport.clients.errors import ApiError
from flowport.server.app import Running, StartupError, start, stop
from flowport.v1 import apikey_pb2, execution_pb2, gateway_pb2, resource_pb2, secret_pb2, workflow_pb2

from ..backends import PostgresServer, free_port
from ..conftest import ADMIN_KEY, make_settings


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start(make_settings(tmp_path / "data", service_check_interval=0.2, service_check_timeout=1.0))
    try:
        yield running
    finally:
        await stop(running, 1.0)


@pytest.fixture
async def admin(server: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as client:
        yield client


def _database(name: str, connection_string: str, **pool: Any) -> resource_pb2.Resource:
    return resource_pb2.Resource(
        name=name, database=resource_pb2.DatabasePool(connection_string=connection_string, **pool)
    )


async def _create(client: AsyncClient, resource: resource_pb2.Resource) -> resource_pb2.Resource:
    return await client.resources.CreateResource(resource_pb2.CreateResourceRequest(resource=resource))


async def _code(awaitable: Any) -> ApiError:
    with pytest.raises(ApiError) as raised:
        await awaitable
    return raised.value


def _sql_workflow(config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "sql", "nodes": [{"type": "SQLDatabaseNode", "name": "q", "config": config}]}


async def _run(client: AsyncClient, workflow: dict[str, Any] | str, **inputs: Any) -> execution_pb2.Execution:
    return await client.run_workflow(workflow, inputs)


def _reason(execution: execution_pb2.Execution) -> str:
    """The ErrorInfo reason of a failed execution."""
    for detail in execution.error.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def _rows(execution: execution_pb2.Execution) -> list[dict[str, Any]]:
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED, execution.error.message
    outputs = json_format.MessageToDict(execution.outputs)
    rows: list[dict[str, Any]] = outputs["q"]["result"]["rows"]
    return rows


async def test_crud_pagination_and_refusals(admin: AsyncClient) -> None:
    made = await _create(admin, _database("main_db", "postgresql://app:${secret:DB_PASSWORD}@db.internal:5432/app"))
    # Defaults are filled in, so a stored resource says what it runs with.
    assert (made.database.pool_size, made.database.max_overflow, made.database.pool_recycle_seconds) == (5, 0, 3600)
    assert made.tenant and made.HasField("create_time") and not made.from_settings
    again = await _code(_create(admin, _database("main_db", "sqlite:///x.db")))
    assert (again.code(), again.reason) == (grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_EXISTS")

    plain = await _code(_create(admin, _database("other", "postgresql://app:hunter2@db/app")))
    assert plain.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in plain.violations] == ["resource.database.connection_string"]
    assert "hunter2" not in plain.details()
    for bad, field in [
        (_database("Bad Name", "sqlite:///x.db"), "resource.name"),
        (_database("x", "mysql://db/app"), "resource.database.connection_string"),
        (_database("x", "sqlite:///x.db", pool_size=500), "resource.database.pool_size"),
        (resource_pb2.Resource(name="x"), "resource.database"),
        (
            resource_pb2.Resource(
                name="x", http=resource_pb2.HttpProfile(base_url="https://api.example", headers={"Authorization": "t"})
            ),
            "resource.http.headers.Authorization",
        ),
        (resource_pb2.Resource(name="x", http=resource_pb2.HttpProfile(base_url="ftp://x")), "resource.http.base_url"),
    ]:
        error = await _code(_create(admin, bad))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in [f for f, _ in error.violations], (field, error.violations)

    for i in range(3):
        await _create(admin, _database(f"db-{i}", f"sqlite:///db{i}.db"))
    first = await admin.resources.ListResources(resource_pb2.ListResourcesRequest(page_size=2))
    second = await admin.resources.ListResources(
        resource_pb2.ListResourcesRequest(page_size=2, page_token=first.next_page_token)
    )
    names = [r.name for r in [*first.resources, *second.resources]]
    assert names == ["db-0", "db-1", "db-2", "main_db"] and not second.next_page_token

    changed = _database("db-0", "sqlite:///elsewhere.db", pool_size=2)
    updated = await admin.resources.UpdateResource(resource_pb2.UpdateResourceRequest(name="db-0", resource=changed))
    assert (updated.database.connection_string, updated.database.pool_size) == ("sqlite:///elsewhere.db", 2)
    assert updated.create_time == first.resources[0].create_time
    to_http = resource_pb2.Resource(http=resource_pb2.HttpProfile(base_url="https://api.example"))
    kind = await _code(
        admin.resources.UpdateResource(resource_pb2.UpdateResourceRequest(name="db-0", resource=to_http))
    )
    assert (kind.code(), kind.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_KIND_CHANGED")
    renamed = await _code(
        admin.resources.UpdateResource(resource_pb2.UpdateResourceRequest(name="db-1", resource=changed))
    )
    assert renamed.code() is grpc.StatusCode.INVALID_ARGUMENT
    missing = await _code(
        admin.resources.UpdateResource(resource_pb2.UpdateResourceRequest(name="nope", resource=to_http))
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND

    await admin.resources.DeleteResource(resource_pb2.DeleteResourceRequest(name="db-2", request_id="del-1"))
    # A retried delete is answered like the first; a new one is NOT_FOUND.
    await admin.resources.DeleteResource(resource_pb2.DeleteResourceRequest(name="db-2", request_id="del-1"))
    gone = await _code(admin.resources.DeleteResource(resource_pb2.DeleteResourceRequest(name="db-2")))
    assert (gone.code(), gone.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


async def test_sql_node_on_a_resource_and_its_pool_lifecycle(
    server: Running, admin: AsyncClient, tmp_path: Path
) -> None:
    await _create(admin, _database("app_db", "sqlite:///app.db", pool_size=2))
    create = _sql_workflow({"resource_name": "app_db", "query": "CREATE TABLE t (id INTEGER, name TEXT)"})
    assert (await _run(admin, create)).state == execution_pb2.Execution.STATE_SUCCEEDED
    insert = _sql_workflow(
        {"resource_name": "app_db", "query": "INSERT INTO t VALUES (:id, :name)", "query_params": {"id": 1}}
    )
    assert (await _run(admin, insert, name="ada")).state == execution_pb2.Execution.STATE_SUCCEEDED
    select = _sql_workflow({"resource_name": "app_db", "query": "SELECT id, name FROM t"})
    assert _rows(await _run(admin, select)) == [{"id": 1, "name": "ada"}]
    pools = server.services.sql
    assert pools is not None and pools.sqlite_root is not None
    # In the tenant's own folder under <data-dir>/sqlite.
    assert pools.sqlite_root == tmp_path / "data" / "sqlite"
    assert (pools.sqlite_root / "default" / "app.db").is_file()
    assert [(name, engine.pool.size()) for _, name, _, engine in pools.resource_pools()] == [("app_db", 2)]

    # Another tenant naming it: not there.
    key = await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="beta", roles=["user"]))
    )
    async with AsyncClient(f"127.0.0.1:{server.port}", api_key=key.key) as beta:
        failed = await _run(beta, select)
    assert failed.state == execution_pb2.Execution.STATE_FAILED
    assert _reason(failed) == "RESOURCE_NOT_FOUND", failed.error.message

    # Both, or neither: refused when the workflow is created, with the field.
    for config, field in [
        ({"resource_name": "app_db", "connection_string": "sqlite:///x.db", "query": "SELECT 1"}, "resource_name"),
        ({"query": "SELECT 1"}, "connection_string"),
    ]:
        workflow = workflow_pb2.Workflow()
        json_format.ParseDict(_sql_workflow(config), workflow)
        error = await _code(admin.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert any(f.endswith(field) for f, _ in error.violations), error.violations

    # An HTTP profile is not a database.
    profile = resource_pb2.Resource(name="api", http=resource_pb2.HttpProfile(base_url="https://api.example"))
    await _create(admin, profile)
    wrong = await _run(admin, _sql_workflow({"resource_name": "api", "query": "SELECT 1"}))
    assert _reason(wrong) == "RESOURCE_KIND_MISMATCH", wrong.error.message

    # Changing the resource replaces the pool; deleting it closes it.
    changed = _database("app_db", "sqlite:///app.db", pool_size=3)
    await admin.resources.UpdateResource(resource_pb2.UpdateResourceRequest(name="app_db", resource=changed))
    assert pools.resource_pools() == []
    assert _rows(await _run(admin, select)) == [{"id": 1, "name": "ada"}]
    assert [engine.pool.size() for *_, engine in pools.resource_pools()] == [3]
    await admin.resources.DeleteResource(resource_pb2.DeleteResourceRequest(name="app_db"))
    assert pools.resource_pools() == []
    after = await _run(admin, select)
    assert _reason(after) == "RESOURCE_NOT_FOUND"


async def test_fifty_concurrent_executions_share_a_pool_of_three(
    server: Running, admin: AsyncClient, postgres_server: PostgresServer
) -> None:
    database = postgres_server.new_database().rsplit("/", 1)[1]
    try:
        port = postgres_server.url.rsplit(":", 1)[1].split("/")[0]
        # The user name and a password with URL delimiters come from the secret store
        # (the server trusts local connections, so any password is accepted).
        for name, value in (("PG_USER", "flowport"), ("PG_PASSWORD", "p@ss/w:rd?#")):
            await admin.secrets.PutSecret(secret_pb2.PutSecretRequest(name=name, value=value))
        url = f"postgresql://${{secret:PG_USER}}:${{secret:PG_PASSWORD}}@127.0.0.1:{port}/{database}"
        await _create(admin, _database("pg", url, pool_size=3))
        query = (
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend') AS connections, current_user AS who, pg_sleep(0.1)::text AS slept"
        )
        workflow = await admin.workflows.CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(
                workflow=_message(_sql_workflow({"resource_name": "pg", "query": query}))
            )
        )
        runs = await asyncio.gather(*(_run(admin, workflow.workflow_id) for _ in range(50)))
        rows = [_rows(run)[0] for run in runs]
        seen = [row["connections"] for row in rows]
        # Connected as the secret PG_USER (no other role exists), which outputs show masked.
        assert {row["who"] for row in rows} == {"***"}
        assert max(seen) <= 3, f"connections seen by the queries: {sorted(seen)}"
        assert max(seen) >= 2, f"the executions never overlapped: {sorted(seen)}"
        outside = postgres_server.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = '{database}'"  # noqa: S608 - the test's own database name
        )
        assert int(outside.strip()) <= 3
        # Masked wherever the node reports text: a failing query's message never shows the password.
        failing = await _run(admin, _sql_workflow({"resource_name": "pg", "query": "SELECT nope FROM nowhere"}))
        assert _reason(failing) == "SQL_ERROR" and "p@ss" not in failing.error.message
    finally:
        pools = server.services.sql
        assert pools is not None
        await pools.close()
        postgres_server.drop_database(database)


def _message(workflow: dict[str, Any]) -> workflow_pb2.Workflow:
    message = workflow_pb2.Workflow()
    json_format.ParseDict(workflow, message)
    return message


async def test_health_reports_resource_pools(server: Running, admin: AsyncClient, tmp_path: Path) -> None:
    await _create(admin, _database("local", "sqlite:///ok.db"))
    assert _rows(await _run(admin, _sql_workflow({"resource_name": "local", "query": "SELECT 1 AS one"}))) == [
        {"one": 1}
    ]
    health = await _wait_pools(admin, lambda c: c.status == "healthy")
    assert health.components["database_pools"].latency > 0
    # A database nobody answers on: the node fails, the pool's check fails and says so; the gateway's
    # own status stays healthy (a tenant's endpoint failing is not the gateway failing).
    await _create(admin, _database("gone", f"postgresql://flowport@127.0.0.1:{free_port()}/none"))
    failed = await _run(admin, _sql_workflow({"resource_name": "gone", "query": "SELECT 1"}))
    assert _reason(failed) == "SQL_UNAVAILABLE", failed.error.message
    health = await _wait_pools(admin, lambda c: c.status == "degraded")
    component = health.components["database_pools"]
    # /health is public: that pools fail, never which nor how many.
    assert component.message == "resource pools failed their last check" and not component.HasField("details")
    assert health.status == "healthy"
    # Deleting the resource closes its pool; the next sweep is healthy again.
    await admin.resources.DeleteResource(resource_pb2.DeleteResourceRequest(name="gone"))
    await _wait_pools(admin, lambda c: c.status == "healthy")


async def _wait_pools(client: AsyncClient, predicate: Any) -> gateway_pb2.Health:
    for _ in range(100):
        health = await client.gateway.GetHealth(gateway_pb2.GetHealthRequest())
        component = health.components.get("database_pools")
        if component is not None and predicate(component):
            return health
        await asyncio.sleep(0.1)
    raise AssertionError(f"database_pools never matched: {health.components.get('database_pools')}")


async def test_resources_from_the_settings_file(tmp_path: Path) -> None:
    declared = {
        "resources": [
            {"tenant": "default", "name": "reports", "database": {"connection_string": "sqlite:///r.db"}},
            {
                "tenant": "acme",
                "name": "partner",
                "http": {"base_url": "https://partner.example", "headers": {"Authorization": "Bearer ${secret:T}"}},
            },
        ]
    }
    path = tmp_path / "resources.json"
    path.write_text(json.dumps(declared))
    running = await start(make_settings(tmp_path / "data", resources_file=path))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            listed = await admin.resources.ListResources(resource_pb2.ListResourcesRequest())
            assert [(r.name, r.from_settings, r.database.pool_size) for r in listed.resources] == [("reports", True, 5)]
            rows = _rows(await _run(admin, _sql_workflow({"resource_name": "reports", "query": "SELECT 2 AS two"})))
            assert rows == [{"two": 2}]
        assert (await running.store.get_resource("acme", "partner")) is not None
    finally:
        await stop(running, 1.0)

    declared["resources"].append({"tenant": "acme", "name": "db", "database": {"connection_string": "mysql://x"}})
    path.write_text(json.dumps(declared))
    with pytest.raises(StartupError, match=r"resources\[2\]\.database\.connection_string"):
        await start(make_settings(tmp_path / "data", resources_file=path))
    declared["resources"][2] = {
        "tenant": "acme",
        "name": "routed",
        "http": {"base_url": "https://partner.example", "headers": {"Host": "internal.admin"}},
    }
    path.write_text(json.dumps(declared))
    with pytest.raises(StartupError, match=r"resources\[2\]\.http\.headers\.Host is set by the HTTP client"):
        await start(make_settings(tmp_path / "data", resources_file=path))
    path.write_text("{not json")
    with pytest.raises(StartupError, match="not JSON"):
        await start(make_settings(tmp_path / "data", resources_file=path))


class _Echo(BaseHTTPRequestHandler):
    """Answers with what it received; /v1/hop redirects to the server in `elsewhere`."""

    elsewhere = ""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/hop"):
            self.send_response(302)
            self.send_header("location", f"{self.elsewhere}/landed")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _http_workflow(node_type: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "call", "nodes": [{"type": node_type, "name": "q", "config": config}]}


def _response(execution: execution_pb2.Execution) -> dict[str, Any]:
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED, execution.error.message
    response: dict[str, Any] = json_format.MessageToDict(execution.outputs)["q"]["response"]
    return response


async def test_http_nodes_on_a_profile(admin: AsyncClient) -> None:
    partner, other = _serve(), _serve()
    _Echo.elsewhere = f"http://127.0.0.1:{other.server_port}"
    try:
        for name, value in (("PARTNER_TOKEN", "tok-123"), ("PARTNER_KEY", "key-456")):
            await admin.secrets.PutSecret(secret_pb2.PutSecretRequest(name=name, value=value))
        profile = resource_pb2.HttpProfile(
            base_url=f"http://127.0.0.1:{partner.server_port}/v1/",
            headers={
                "Authorization": "Bearer ${secret:PARTNER_TOKEN}",
                "X-Partner-Key": "${secret:PARTNER_KEY}",
                "X-Client": "flowport",
            },
            timeout_seconds=5,
        )
        await _create(admin, resource_pb2.Resource(name="partner", http=profile))

        got = _response(
            await _run(
                admin,
                _http_workflow(
                    "HTTPRequestNode",
                    {"resource_name": "partner", "url": "orders?id=7", "headers": {"x-client": "mine"}},
                ),
            )
        )
        echoed = got["json"]
        assert echoed["path"] == "/v1/orders?id=7"
        # The secrets reached the partner, and the echo of them is masked in the recorded outputs.
        assert echoed["headers"]["authorization"] == "Bearer ***" and echoed["headers"]["x-partner-key"] == "***"
        assert echoed["headers"]["x-client"] == "mine"  # the node's own header wins
        assert "tok-123" not in json.dumps(got) and "key-456" not in json.dumps(got)

        # The base_url alone; and the same profile from RateLimitedAPINode.
        limited = {"resource_name": "partner", "rate_limit": {"max_requests": 5, "time_window": 1.0}}
        assert _response(await _run(admin, _http_workflow("RateLimitedAPINode", limited)))["json"]["path"] == "/v1/"

        # Leaving the profile's origin is refused before anything is sent.
        away = await _run(
            admin,
            _http_workflow(
                "HTTPRequestNode", {"resource_name": "partner", "url": f"http://127.0.0.1:{other.server_port}/x"}
            ),
        )
        assert _reason(away) == "HTTP_OUTSIDE_RESOURCE", away.error.message

        # A redirect to another origin drops every header that holds a secret.
        hop = _response(
            await _run(
                admin,
                _http_workflow("HTTPRequestNode", {"resource_name": "partner", "url": "hop", "follow_redirects": True}),
            )
        )
        landed = hop["json"]
        assert landed["path"] == "/landed"
        assert "authorization" not in landed["headers"] and "x-partner-key" not in landed["headers"]
        assert landed["headers"]["x-client"] == "flowport"

        database = await _run(admin, _http_workflow("HTTPRequestNode", {"resource_name": "nope"}))
        assert _reason(database) == "RESOURCE_NOT_FOUND"
    finally:
        for server in (partner, other):
            server.shutdown()
            server.server_close()


async def test_inputs_cannot_redirect_a_resource(admin: AsyncClient, tmp_path: Path) -> None:
    await _create(admin, _database("app_db", "sqlite:///pinned.db"))
    sql = _sql_workflow({"resource_name": "app_db", "query": "SELECT 1 AS one"})
    assert _rows(await _run(admin, sql)) == [{"one": 1}]
    # An input keyed by the node's id overrides its config: not for the statement run on a resource...
    other_query = await _run(admin, sql, q={"query": "SELECT 2 AS two"})
    assert _reason(other_query) == "RESOURCE_NOT_FROM_CONFIG", other_query.error.message
    # ...nor for which resource a node with a connection string uses.
    plain = _sql_workflow({"connection_string": "sqlite:///other.db", "query": "SELECT 1 AS one"})
    both = await _run(admin, plain, q={"resource_name": "app_db"})
    assert _reason(both) == "INVALID_PARAMETER", both.error.message

    profile = resource_pb2.HttpProfile(base_url="http://127.0.0.1:9/v1/")
    await _create(admin, resource_pb2.Resource(name="partner", http=profile))
    call = _http_workflow("HTTPRequestNode", {"resource_name": "partner", "url": "orders"})
    for override in ({"url": "refunds"}, {"method": "DELETE"}, {"resource_name": "app_db"}):
        redirected = await _run(admin, call, q=override)
        assert _reason(redirected) == "RESOURCE_NOT_FROM_CONFIG", (override, redirected.error.message)
    limited = _http_workflow(
        "RateLimitedAPINode",
        {"resource_name": "partner", "rate_limit": {"max_requests": 1, "time_window": 60.0}},
    )
    lifted = await _run(admin, limited, q={"rate_limit": {"max_requests": 1000, "time_window": 1.0}})
    assert _reason(lifted) == "CONFIG_ONLY_PARAMETER", lifted.error.message


def test_profile_urls_stay_under_the_base_path() -> None:
    from flowport.server.nodes.base import NodeError
    from flowport.server.nodes.http import profile_url
    from flowport.server.resources.directory import HttpResource

    profile = HttpResource("p", "https://api.example.com/v2", {}, None, frozenset(), ())
    assert profile_url(profile, None) == "https://api.example.com/v2"
    assert profile_url(profile, "users?id=7") == "https://api.example.com/v2/users?id=7"
    assert profile_url(profile, "/users") == "https://api.example.com/v2/users"
    assert profile_url(profile, "https://api.example.com/v3/x") == "https://api.example.com/v3/x"
    with pytest.raises(NodeError) as away:
        profile_url(profile, "https://api.example.com:8443/x")
    assert away.value.reason == "HTTP_OUTSIDE_RESOURCE"


async def test_a_bad_port_is_a_clear_400(admin: AsyncClient) -> None:
    error = await _code(_create(admin, _database("x", "postgresql://app@db.internal:notaport/app")))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == ["resource.database.connection_string"]


async def test_a_pool_replaced_while_in_use_is_disposed_after_its_last_statement(tmp_path: Path) -> None:
    from flowport.server.nodes.sql_pools import SqlPools

    pools = SqlPools(sqlite_root=tmp_path / "sqlite")
    url = "sqlite:///held.db"
    first = pools.resource_engine("t", "db", "v1", url, pool_size=2, max_overflow=0, pool_recycle=3600)
    # Disposing an engine swaps in a fresh pool object: that is how disposal is seen here.
    original = first.sync_engine.pool
    async with pools.using(first) as engine:
        replacement = pools.resource_engine("t", "db", "v2", url, pool_size=2, max_overflow=0, pool_recycle=3600)
        assert replacement is not first and not pools.is_current(first)
        await asyncio.sleep(0.05)
        assert first.sync_engine.pool is original, "disposed while a statement still held it"
        async with engine.connect() as conn:  # the running statement carries on
            await conn.exec_driver_sql("SELECT 1")
    for _ in range(100):
        if first.sync_engine.pool is not original:
            break
        await asyncio.sleep(0.01)
    assert first.sync_engine.pool is not original, "not disposed after its last statement"
    await pools.close()


async def test_database_resources_go_through_the_sql_guard(tmp_path: Path, postgres_server: PostgresServer) -> None:
    running = await start(
        make_settings(tmp_path / "data", sql_allowlist="", service_check_interval=0.2, service_check_timeout=1.0)
    )
    database = postgres_server.new_database().rsplit("/", 1)[1]
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            # Targets found elsewhere than the URL's host are refused when the resource is registered.
            for where in ("postgresql://app@/app", "postgresql://app@/app?host=/var/run/postgresql"):
                error = await _code(_create(admin, _database("sock", where)))
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, where
                assert [f for f, _ in error.violations] == ["resource.database.connection_string"]
            port = postgres_server.url.rsplit(":", 1)[1].split("/", 1)[0]
            await _create(admin, _database("local", f"postgresql://flowport@127.0.0.1:{port}/{database}"))
            key = await admin.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="default", roles=["user"]))
            )
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=key.key) as user:
            # Loopback is not allowlisted here: the node never reaches the database...
            failed = await _run(user, _sql_workflow({"resource_name": "local", "query": "SELECT current_user AS who"}))
            assert _reason(failed) == "SQL_UNAVAILABLE", failed.error.message
            assert f"could not connect to the database at 127.0.0.1:{port}" in failed.error.message
            # ...nor does the health sweep of its pool, its only one (a ping that connected would be healthy).
            await _wait_pools(user, lambda c: c.status == "degraded")
    finally:
        await stop(running, 1.0)
        postgres_server.drop_database(database)


async def test_profile_header_values_http_cannot_carry_are_refused(admin: AsyncClient) -> None:
    for value in ("Jos\u00e9", "a\x01b", "padded ", "two\r\nlines"):
        profile = resource_pb2.HttpProfile(base_url="https://api.example", headers={"X-Name": value})
        error = await _code(_create(admin, resource_pb2.Resource(name="p", http=profile)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, value
        assert [f for f, _ in error.violations] == ["resource.http.headers.X-Name"]
        assert value.strip() not in error.details() and value.strip() not in str(error.violations)
    # A reference is checked when a node fills it in (server/nodes/http.py).
    profile = resource_pb2.HttpProfile(base_url="https://api.example", headers={"Authorization": "Bearer ${secret:T}"})
    assert (await _create(admin, resource_pb2.Resource(name="p", http=profile))).name == "p"


async def test_profile_headers_the_http_client_owns_are_refused(admin: AsyncClient) -> None:
    for name in ("Host", "transfer-encoding", "Content-Length", "Connection", "Upgrade", "Proxy-Authorization"):
        profile = resource_pb2.HttpProfile(base_url="https://api.example", headers={name: "internal.admin"})
        for call in (
            _create(admin, resource_pb2.Resource(name="p", http=profile)),
            admin.resources.UpdateResource(
                resource_pb2.UpdateResourceRequest(name="p", resource=resource_pb2.Resource(name="p", http=profile))
            ),
        ):
            error = await _code(call)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, name
            [(field, description)] = error.violations
            assert field == f"resource.http.headers.{name}"
            assert description.startswith("is set by the HTTP client"), description
            assert "internal.admin" not in error.details()
    # A name that is not an HTTP token (a final newline slipped through `$`) is quoted, not echoed raw.
    for name in ("X-A\n", "X A", "X-A\r\nHost"):
        profile = resource_pb2.HttpProfile(base_url="https://api.example", headers={name: "v"})
        error = await _code(_create(admin, resource_pb2.Resource(name="p", http=profile)))
        [(field, description)] = error.violations
        assert field == "resource.http.headers", name
        assert "is not a valid HTTP header name" in description and "\n" not in description, description


async def test_a_stored_profile_with_a_header_the_client_owns_fails_the_node(
    server: Running, admin: AsyncClient
) -> None:
    # As a resource stored before the rule (or written to the store by hand) would be.
    echo = _serve()
    try:
        profile = resource_pb2.HttpProfile(
            base_url=f"http://127.0.0.1:{echo.server_port}/", headers={"Transfer-Encoding": "chunked"}
        )
        await server.store.put_resource("default", resource_pb2.Resource(name="old", http=profile), 1)
        failed = await _run(admin, _http_workflow("HTTPRequestNode", {"resource_name": "old", "method": "POST"}))
        assert failed.state == execution_pb2.Execution.STATE_FAILED
        assert _reason(failed) == "INVALID_PARAMETER"
        assert "header Transfer-Encoding of resource 'old' is set by the HTTP client" in failed.error.message
    finally:
        echo.shutdown()
        echo.server_close()


async def test_a_database_resource_keeps_its_sqlite_file_in_the_tenants_folder(
    server: Running, admin: AsyncClient, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for connection in (
        f"sqlite:///{outside}/evil.pth",
        "sqlite:///../other-tenant/app.db",
        "sqlite:///sub/app.db",
        f"sqlite:///file:{outside}/evil.pth?uri=true",
    ):
        error = await _code(_create(admin, _database("escape", connection)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, connection
        assert [f for f, _ in error.violations] == ["resource.database.connection_string"]
        assert str(outside) not in error.details() and "tenant's own folder" in error.details()
    # One stored before this rule (or written to the store directly) fails its node, opening nothing.
    stored = _database("legacy", f"sqlite:///{outside}/legacy.db")
    await server.store.put_resource("default", stored, 0)
    failed = await _run(admin, _sql_workflow({"resource_name": "legacy", "query": "CREATE TABLE t (x INTEGER)"}))
    assert _reason(failed) == "SQL_DATABASE_FORBIDDEN", failed.error.message
    assert list(outside.iterdir()) == []
    pools = server.services.sql
    assert pools is not None and pools.resource_pools() == []


async def test_a_tenants_open_resource_pools_are_bounded_least_recently_used_out(tmp_path: Path) -> None:
    from flowport.server.nodes import sql_pools
    from flowport.server.nodes.sql_pools import SqlPools

    pools = SqlPools(sqlite_root=tmp_path / "sqlite")
    try:
        others = pools.resource_engine(
            "other", "db", "v1", "sqlite:///:memory:", pool_size=1, max_overflow=0, pool_recycle=60
        )
        engines = [
            pools.resource_engine(
                "t", f"db{n}", "v1", "sqlite:///:memory:", pool_size=1, max_overflow=0, pool_recycle=60
            )
            for n in range(sql_pools.MAX_RESOURCE_POOLS_PER_TENANT + 4)
        ]
        open_pools = {name for tenant, name, _, _ in pools.resource_pools() if tenant == "t"}
        assert open_pools == {f"db{n}" for n in range(4, sql_pools.MAX_RESOURCE_POOLS_PER_TENANT + 4)}
        assert not pools.is_current(engines[0]) and pools.is_current(engines[-1])
        assert pools.is_current(others), "another tenant's pool stays"
    finally:
        await pools.close()


def test_too_many_headers_or_labels_are_refused_without_looking_at_each() -> None:
    """Past the count, the one violation says so, and none of the items is checked (200,000 headers
    in a 4 MB request held the event loop 1.2 s while each was sorted and checked)."""
    from flowport.server.api.service_registry import MAX_LABELS, _violations
    from flowport.server.resources.spec import MAX_HEADERS, check
    from flowport.v1 import registry_pb2

    resource = resource_pb2.Resource(name="api", http=resource_pb2.HttpProfile(base_url="https://api.example.com"))
    resource.http.headers.update({f"bad name {n}": "v" for n in range(MAX_HEADERS + 1)})
    assert check(resource) == [("resource.http.headers", f"at most {MAX_HEADERS}")]
    service = registry_pb2.RegisteredService(service_id="s1", endpoint="https://s.example.com")
    service.capabilities.extend(["bad label!"] * (MAX_LABELS + 1))
    assert _violations(service) == [("service.capabilities", f"at most {MAX_LABELS}")]
