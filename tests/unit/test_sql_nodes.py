"""SQLDatabaseNode / AsyncSQLDatabaseNode on a SQLite file, and on a
throw-away PostgreSQL cluster when PostgreSQL is installed."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import glob
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from sqlalchemy.engine import make_url

from flowport.clients import AsyncClient
from flowport.clients.errors import ApiError
from flowport.server.app import start, stop
from flowport.server.egress import TargetRefused
from flowport.server.engine.executor import Executor
from flowport.server.engine.plan import PlanCache, compile_plan
from flowport.server.engine.registry import NodeRegistry
from flowport.server.events.bus import EventBus
from flowport.server.nodes import sql_pools, sqlite_temp_space
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.sql import AsyncSQLDatabaseNode, SQLDatabaseNode, jsonable, prepare_query
from flowport.server.nodes.sql_pools import ForbiddenDatabase, SqlPools, async_url, pin_connection, sqlite_folder
from flowport.server.nodes.substitution import Parameters, execution_variables
from flowport.server.storage import SqliteStore
from flowport.v1 import apikey_pb2, execution_pb2, workflow_pb2

from ..backends import free_port
from ..conftest import ADMIN_KEY, make_settings

SEED_SELECT = """
    SELECT id, name, status, tenant_id, created_at
    FROM enterprise_records
    WHERE tenant_id = :tenant_id AND status = :status
    ORDER BY created_at DESC, id DESC
    LIMIT :limit
"""
SEED_PARAMS = {"tenant_id": "${session.tenant_id}", "status": "active", "limit": 100}
RECORDS = [
    ("alpha", "active", "acme", "2026-01-01T10:00:00"),
    ("beta", "active", "acme", "2026-01-02T10:00:00"),
    ("gamma", "archived", "acme", "2026-01-03T10:00:00"),
    ("delta", "active", "globex", "2026-01-04T10:00:00"),
]


# The tests' PostgreSQL listens on loopback, which SQL nodes reach only when allowlisted.
LOOPBACK = frozenset({"127.0.0.1"})


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[SqlPools]:
    shared = SqlPools(LOOPBACK, sqlite_root=tmp_path / "sqlite")
    yield shared
    await shared.close()


@pytest.fixture
def sqlite_url() -> str:
    # A file in the tenant's own folder: <sqlite root>/acme/app.db for make_ctx's tenant.
    return "sqlite:///app.db"


def make_ctx(pools: SqlPools | None, timeout: float = 10.0) -> NodeContext:
    return NodeContext(
        tenant="acme", execution_id="exe_1", node_id="db", attempt=1, timeout=timeout, services=NodeServices(sql=pools)
    )


async def run_sql(
    ctx: NodeContext, connection_string: str, query: str, node: SQLDatabaseNode | None = None, **params: Any
) -> dict[str, Any]:
    node = node or SQLDatabaseNode()
    merged = {"connection_string": connection_string, "query": query, **params}
    return await node.run(ctx, node.prepare(merged), merged)


async def create_records(ctx: NodeContext, url: str, *, id_column: str = "INTEGER PRIMARY KEY") -> None:
    await run_sql(
        ctx,
        url,
        f"CREATE TABLE enterprise_records (id {id_column}, name TEXT NOT NULL, status TEXT NOT NULL, "
        "tenant_id TEXT NOT NULL, created_at TEXT NOT NULL)",
    )
    for name, status, tenant, created in RECORDS:
        out = await run_sql(
            ctx,
            url,
            "INSERT INTO enterprise_records (name, status, tenant_id, created_at) "
            "VALUES (:name, :status, :tenant, :at)",
            query_params={"name": name, "status": status, "tenant": "${tenant}", "at": created},
            tenant=tenant,
        )
        assert out["result"] == {"rows": [], "row_count": 1, "columns": []}


# -- SQLite ---------------------------------------------------------------------


@pytest.mark.parametrize("node_type", [SQLDatabaseNode, AsyncSQLDatabaseNode])
async def test_seed_select_on_sqlite(
    pools: SqlPools, sqlite_url: str, node_type: type[SQLDatabaseNode], tmp_path: Path
) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)
    out = await run_sql(
        ctx, sqlite_url, SEED_SELECT, node_type(), query_params=SEED_PARAMS, session={"tenant_id": "acme"}
    )
    assert out["result"]["columns"] == ["id", "name", "status", "tenant_id", "created_at"]
    assert set(out) == {"result"}, "rows are kept once; `rows` and `row_count` are connection aliases"
    assert out["result"]["row_count"] == 2
    assert out["result"]["rows"] == [
        {"id": 2, "name": "beta", "status": "active", "tenant_id": "acme", "created_at": "2026-01-02T10:00:00"},
        {"id": 1, "name": "alpha", "status": "active", "tenant_id": "acme", "created_at": "2026-01-01T10:00:00"},
    ]
    # The writes were committed: another connection sees them.
    with sqlite3.connect(tmp_path / "sqlite" / "acme" / "app.db") as raw:
        assert raw.execute("SELECT count(*) FROM enterprise_records").fetchone() == (4,)


async def test_parameters_from_node_params_and_aliases(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)
    # No query_params: parameters with the bind names are used (but for the execution's own
    # variables, such as :tenant_id: see test_execution_variable_binds_are_the_executions_own).
    out = await run_sql(ctx, sqlite_url, SEED_SELECT, status="archived", limit=10)
    assert [row["name"] for row in out["result"]["rows"]] == ["gamma"]
    # `parameters` is the seed's other name; query_params wins over it, both win over plain params.
    out = await run_sql(
        ctx,
        sqlite_url,
        SEED_SELECT,
        parameters={"tenant_id": "globex", "status": "archived", "limit": 1},
        query_params={"status": "active"},
        tenant_id="acme",
    )
    assert [row["name"] for row in out["result"]["rows"]] == ["delta"]


async def test_injection_attempt_is_just_a_value(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)
    for evil in ("x' OR '1'='1", "active' --", "active'; DROP TABLE enterprise_records; --"):
        out = await run_sql(ctx, sqlite_url, SEED_SELECT, status=evil, limit=100)
        assert out["result"]["rows"] == [], evil
        assert out["result"]["row_count"] == 0
    out = await run_sql(ctx, sqlite_url, "SELECT count(*) AS n FROM enterprise_records")
    assert out["result"]["rows"] == [{"n": 4}]


async def test_missing_parameter(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, SEED_SELECT, tenant_id="acme", limit=5)
    assert caught.value.reason == "SQL_MISSING_PARAMETER"
    assert ":status" in caught.value.message
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, SEED_SELECT, query_params=SEED_PARAMS)  # no `session` to resolve from
    assert caught.value.reason == "UNRESOLVED_REFERENCE"
    assert "session.tenant_id" in caught.value.message


# -- the execution's own variables as bind parameters -------------------------------

TENANT_SELECT = "SELECT name FROM enterprise_records WHERE tenant_id = :tenant_id ORDER BY id"
OWN_SELECT = "SELECT :tenant_id AS t, :session_id AS s, :execution_id AS e, :workflow_id AS w"


async def test_execution_variable_binds_are_the_executions_own(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)  # a shared table: acme's rows and globex's
    # A caller's `tenant_id` does not reach :tenant_id: it is the execution's tenant.
    out = await run_sql(ctx, sqlite_url, TENANT_SELECT, tenant_id="globex")
    assert [row["name"] for row in out["result"]["rows"]] == ["alpha", "beta", "gamma"]
    # Nor does a query_params an input or a connection gives (the config has none).
    node = SQLDatabaseNode()
    config = {"connection_string": sqlite_url, "query": TENANT_SELECT}
    posing = {**config, "query_params": {"tenant_id": "globex"}, "parameters": {"tenant_id": "globex"}}
    out = await node.run(ctx, node.prepare(config), posing)
    assert [row["name"] for row in out["result"]["rows"]] == ["alpha", "beta", "gamma"]
    # In a run, all four come from the execution, whatever the parameters say.
    variables = execution_variables("acme", "s-1", "exe_1", "wf")
    given = {"tenant_id": "globex", "session_id": "s-x", "execution_id": "e-x", "workflow_id": "w-x"}
    config = {"connection_string": sqlite_url, "query": OWN_SELECT}
    out = await node.run(ctx, node.prepare(config), Parameters({**config, **given}, variables))
    assert out["result"]["rows"] == [{"t": "acme", "s": "s-1", "e": "exe_1", "w": "wf"}]
    # Outside a run only the context's two are known: a parameter never stands in for the others.
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, OWN_SELECT, **given)
    assert caught.value.reason == "SQL_MISSING_PARAMETER"
    assert ":session_id" in caught.value.message


async def test_an_explicit_mapping_of_an_execution_variable_bind_is_honoured(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)
    variables = execution_variables("acme", "s-1", "exe_1", "wf")
    node = SQLDatabaseNode()

    async def names(query_params: dict[str, Any], **params: Any) -> list[str]:
        config = {"connection_string": sqlite_url, "query": TENANT_SELECT, "query_params": query_params}
        out = await node.run(ctx, node.prepare(config), Parameters({**config, **params}, variables))
        return [row["name"] for row in out["result"]["rows"]]

    # The execution's own variables, as the seed writes it: still the execution's, whatever is given.
    assert await names({"tenant_id": "${tenant_id}"}, tenant_id="globex") == ["alpha", "beta", "gamma"]
    session = {"tenant_id": "globex"}
    assert await names({"tenant_id": "${session.tenant_id}"}, session=session) == ["alpha", "beta", "gamma"]
    # Anything else the workflow's author maps it to is their choice: an input of another name, a value.
    assert await names({"tenant_id": "${customer_tenant}"}, customer_tenant="globex") == ["delta"]
    assert await names({"tenant_id": "globex"}) == ["delta"]
    # `parameters`, the seed's other name, maps it too.
    config = {"connection_string": sqlite_url, "query": TENANT_SELECT, "parameters": {"tenant_id": "globex"}}
    out = await node.run(ctx, node.prepare(config), Parameters(config, variables))
    assert [row["name"] for row in out["result"]["rows"]] == ["delta"]


SQL_REGISTRY = NodeRegistry([SQLDatabaseNode])


def sql_workflow(name: str, nodes: list[dict[str, Any]], connections: list[dict[str, str]] | None = None) -> Any:
    message = json_format.ParseDict(
        {"name": name, "nodes": nodes, "connections": connections or []}, workflow_pb2.Workflow()
    )
    message.workflow_id, message.version, message.tenant = name, 1, "acme"
    return message


def sql_node(node_id: str, query: str, **config: Any) -> dict[str, Any]:
    return {
        "type": "SQLDatabaseNode",
        "id": node_id,
        "config": {"connection_string": "sqlite:///app.db", "query": query, **config},
    }


@dataclass
class SqlRunner:
    executor: Executor

    async def run(self, workflow: Any, values: dict[str, Any]) -> tuple[execution_pb2.Execution, dict[str, Any]]:
        """Run `workflow` for tenant acme in session sess-1; the execution and its outputs."""
        given = struct_pb2.Struct()
        given.update(values)
        execution, _ = await self.executor.create(
            "acme", workflow, given, session_id="sess-1", request_id="", request_hash=None
        )
        done = await self.executor.wait("acme", execution.execution_id, 10)
        assert done is not None and done.state == execution_pb2.Execution.STATE_SUCCEEDED, done
        return done, json_format.MessageToDict(done.outputs)


@pytest.fixture
async def sql_runner(pools: SqlPools, sqlite_url: str, tmp_path: Path) -> AsyncIterator[SqlRunner]:
    """An executor of SQL nodes on acme's SQLite file, which holds RECORDS (acme's rows and globex's)."""
    await create_records(make_ctx(pools), sqlite_url)
    store = await SqliteStore.open(tmp_path / "store.sqlite")
    executor = Executor(store, PlanCache(SQL_REGISTRY), EventBus(), NodeServices(sql=pools), max_concurrent=4)
    try:
        yield SqlRunner(executor)
    finally:
        await executor.shutdown()
        await store.close()


async def test_in_a_workflow_an_input_never_sets_an_execution_variable_bind(sql_runner: SqlRunner) -> None:
    own = sql_workflow(
        "own_binds",
        [
            sql_node("q", TENANT_SELECT),
            sql_node("o", OWN_SELECT),
            sql_node(
                "m",
                "SELECT :tenant_id AS t, :who AS who",
                query_params={"tenant_id": "${tenant_id}", "who": "${session.tenant_id}"},
            ),
        ],
    )
    # An input of the same name, at the top level or under the node's id (there as query_params
    # too), poses in vain.
    posing = {"tenant_id": "globex", "session_id": "s-x", "execution_id": "e-x", "workflow_id": "w-x"}
    values = {**posing, "q": {**posing, "query_params": {"tenant_id": "globex"}}, "o": posing, "m": posing}
    done, outputs = await sql_runner.run(own, values)
    assert [row["name"] for row in outputs["q"]["result"]["rows"]] == ["alpha", "beta", "gamma"]
    assert outputs["o"]["result"]["rows"] == [{"t": "acme", "s": "sess-1", "e": done.execution_id, "w": "own_binds"}]
    assert outputs["m"]["result"]["rows"] == [{"t": "acme", "who": "acme"}]


async def test_in_a_workflow_a_connection_never_sets_an_execution_variable_bind(sql_runner: SqlRunner) -> None:
    connected = sql_workflow(
        "own_binds_connected",
        [sql_node("source", "SELECT 'globex' AS t"), sql_node("q", TENANT_SELECT)],
        [{"from_node": "source", "from_output": "rows[0].t", "to_node": "q", "to_input": "tenant_id"}],
    )
    _, outputs = await sql_runner.run(connected, {})
    assert [row["name"] for row in outputs["q"]["result"]["rows"]] == ["alpha", "beta", "gamma"]


async def test_execution_variable_binds_are_not_required_inputs(sql_runner: SqlRunner) -> None:
    own = sql_workflow(
        "own_required",
        [
            sql_node("o", OWN_SELECT),
            sql_node("m", "SELECT :tenant_id AS t", query_params={"tenant_id": "${session.tenant_id}"}),
            sql_node("r", "SELECT :session_id AS s", query_params={"session_id": "${session_id}"}),
        ],
    )
    plan = compile_plan(own, SQL_REGISTRY)
    assert plan.inputs_schema["required"] == []
    assert plan.missing_inputs({}) == []
    # And an execution given nothing runs (no 400 at inputs.tenant_id).
    _, outputs = await sql_runner.run(own, {})
    assert outputs["o"]["result"]["rows"][0]["t"] == "acme"
    assert outputs["m"]["result"]["rows"] == [{"t": "acme"}]
    assert outputs["r"]["result"]["rows"] == [{"s": "sess-1"}]


async def test_row_cap(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, "SELECT * FROM enterprise_records", max_rows=3)
    assert caught.value.reason == "SQL_TOO_MANY_ROWS"
    assert len((await run_sql(ctx, sqlite_url, "SELECT * FROM enterprise_records", max_rows=4))["result"]["rows"]) == 4
    # A write returning too many rows is rolled back.
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, "UPDATE enterprise_records SET status = 'x' RETURNING id", max_rows=1)
    assert caught.value.reason == "SQL_TOO_MANY_ROWS"
    out = await run_sql(ctx, sqlite_url, "SELECT count(*) AS n FROM enterprise_records WHERE status = 'x'")
    assert out["result"]["rows"] == [{"n": 0}]


async def test_rows_that_outgrow_a_nodes_outputs_fail_before_all_are_held(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    # 40 rows of 1 MB blobs (base64: 1.3 MB each), well under max_rows: past 8 MiB the fetch stops.
    blobs = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40) "
        "SELECT i, zeroblob(1000000) AS b FROM n"
    )
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, blobs)
    assert caught.value.reason == "OUTPUT_TOO_LARGE" and "8388608 bytes" in caught.value.message
    # Under the bound, the same query answers.
    few = await run_sql(ctx, sqlite_url, blobs.replace("i < 40", "i < 3"))
    assert few["result"]["row_count"] == 3 and len(few["result"]["rows"][0]["b"]) == 1333336


def test_rows_are_fetched_in_batches_that_fit_what_is_left() -> None:
    from types import SimpleNamespace

    from flowport.server.nodes.sql import FETCH_BATCH, _execute, _TooLarge

    asked: list[int] = []
    big = "x" * 2**20  # rows of about 1 MiB

    class Rows:
        returns_rows = True
        left = 1000

        def keys(self) -> list[str]:
            return ["b"]

        def fetchmany(self, size: int) -> list[tuple[str]]:
            asked.append(size)
            given = min(size, self.left)
            self.left -= given
            return [(big,)] * given

        def close(self) -> None:
            pass

    conn = SimpleNamespace(execute=lambda statement, values: Rows())
    prepared = SimpleNamespace(statement="SELECT", streamed=False)
    with pytest.raises(_TooLarge):
        _execute(conn, prepared, {}, 100_000, None)  # type: ignore[arg-type]
    # One row first, then as many as still fit (7 of about 1 MiB), then one at a time: never 1000.
    assert asked[:2] == [1, 6] and max(asked) < FETCH_BATCH and sum(asked) <= 9, asked
    small: list[int] = []
    asked = small

    class SmallRows(Rows):
        def fetchmany(self, size: int) -> list[tuple[str]]:
            small.append(size)
            given = min(size, self.left)
            self.left -= given
            return [("x",)] * given

    conn = SimpleNamespace(execute=lambda statement, values: SmallRows())
    out = _execute(conn, prepared, {}, 100_000, None)  # type: ignore[arg-type]
    assert out["row_count"] == 1000 and small[:2] == [1, FETCH_BATCH]  # small rows: full batches


async def test_write_row_counts_and_errors(pools: SqlPools, sqlite_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, sqlite_url)
    out = await run_sql(
        ctx, sqlite_url, "UPDATE enterprise_records SET status = :to WHERE tenant_id = :t", to="done", t="acme"
    )
    assert out == {"result": {"rows": [], "row_count": 3, "columns": []}}
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, "SELECT * FROM no_such_table")
    assert caught.value.reason == "SQL_ERROR"
    assert "no_such_table" in caught.value.message
    # Two statements in one query are refused by the driver.
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, sqlite_url, "SELECT 1; DELETE FROM enterprise_records")
    assert caught.value.reason == "SQL_ERROR"
    out = await run_sql(ctx, sqlite_url, "SELECT count(*) AS n FROM enterprise_records")
    assert out["result"]["rows"] == [{"n": 4}]


async def test_timeout_interrupts_sqlite(pools: SqlPools, sqlite_url: str) -> None:
    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) SELECT count(*) FROM c"
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools, timeout=0.3), sqlite_url, slow)
    assert caught.value.reason == "SQL_TIMEOUT"
    # The pooled connection is usable again.
    assert (await run_sql(make_ctx(pools), sqlite_url, "SELECT 1 AS one"))["result"]["rows"] == [{"one": 1}]
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools, timeout=0.0), sqlite_url, "SELECT 1")
    assert caught.value.reason == "SQL_TIMEOUT"


async def test_unsupported_scheme(pools: SqlPools) -> None:
    config = {"connection_string": "mysql://u:p@db/app", "query": "SELECT 1"}
    violations = SQLDatabaseNode.validate_config(config, "nodes[0].config")
    assert [path for path, _ in violations] == ["nodes[0].config.connection_string"]
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools), "mysql://u:p@db/app", "SELECT 1")
    assert caught.value.reason == "SQL_UNSUPPORTED_DATABASE"
    assert len(pools) == 0


def test_config_validation() -> None:
    seed = {
        "connection_string": "postgresql://enterprise-user:pass@db-cluster:5432/enterprise",
        "pool_size": 20,
        "max_overflow": 50,
        "pool_recycle": 3600,
        "echo": False,
        "query": SEED_SELECT,
        "query_params": SEED_PARAMS,
    }
    assert AsyncSQLDatabaseNode.validate_config(seed, "nodes[2].config") == []
    missing = SQLDatabaseNode.validate_config({"connection_string": "sqlite:///x.db"}, "nodes[0].config")
    assert [path for path, _ in missing] == ["nodes[0].config.query"]
    wrong = SQLDatabaseNode.validate_config(
        {"connection_string": "sqlite:///x.db", "query": "SELECT 1", "max_rows": 0}, "nodes[0].config"
    )
    assert [path for path, _ in wrong] == ["nodes[0].config.max_rows"]
    for node_type in (SQLDatabaseNode, AsyncSQLDatabaseNode):
        assert node_type.retry_safe is False
        assert set(node_type.output_names()) == {"result", "rows", "row_count"}


async def test_pool_is_shared_within_a_tenant(pools: SqlPools) -> None:
    url = "sqlite:///shared.db"
    engine = pools.engine(url, tenant="acme")
    assert pools.engine(url, tenant="acme") is engine
    assert pools.engine("sqlite+aiosqlite:///shared.db", tenant="acme") is engine
    assert pools.engine("sqlite:///other.db", tenant="acme") is not engine
    # Another tenant never gets the same pooled connections (or in-memory database).
    assert pools.engine(url, tenant="globex") is not engine
    assert engine.url.drivername == "sqlite+aiosqlite"
    for _ in range(3):
        await run_sql(make_ctx(pools), url, "SELECT 1")  # tenant acme: the same engine
    assert len(pools) == 3
    await pools.close()
    assert len(pools) == 0
    assert pools.engine(url, tenant="acme") is not engine


async def test_tenants_do_not_share_an_in_memory_database(pools: SqlPools) -> None:
    acme = make_ctx(pools)
    globex = NodeContext(
        tenant="globex", execution_id="exe_2", node_id="db", attempt=1, timeout=10.0, services=NodeServices(sql=pools)
    )
    memory = "sqlite:///:memory:"
    await run_sql(acme, memory, "CREATE TABLE cache (v TEXT)")
    await run_sql(acme, memory, "INSERT INTO cache VALUES ('acme data')")
    assert (await run_sql(acme, memory, "SELECT v FROM cache"))["result"]["rows"] == [{"v": "acme data"}]
    with pytest.raises(NodeError, match="no such table"):
        await run_sql(globex, memory, "SELECT v FROM cache")


def test_async_url_mapping() -> None:
    assert async_url("postgresql://u:p@h:5432/db").drivername == "postgresql+asyncpg"
    assert async_url("postgres://u:p@h/db").drivername == "postgresql+asyncpg"
    assert async_url("sqlite:///app.db").database == "app.db"
    assert async_url("sqlite:///:memory:").database == ":memory:"


async def test_missing_sql_service(sqlite_url: str) -> None:
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(None), sqlite_url, "SELECT 1")
    assert caught.value.reason == "SQL_POOLS_UNAVAILABLE"


@pytest.mark.timeout(30)
def test_leading_comments_are_skipped_in_time_linear_in_the_query() -> None:
    """A run of "/**/" could be split in exponentially many ways by the old pattern: 161 bytes held
    the event loop for days. Each of these ends at once (the test's timeout is the bound)."""
    assert prepare_query("/**/" * 40 + "x").streamed is False
    assert prepare_query("/**/" * 40 + " select 1").streamed is True
    assert prepare_query("/*" + "*" * 100_000).streamed is False  # never closed
    assert prepare_query("-- a\n/* b */ ( select 1)").streamed is True
    assert prepare_query("/* select */ delete from t").streamed is False


def test_prepare_and_jsonable() -> None:
    prepared = prepare_query(SEED_SELECT)
    assert prepared.bind_names == ("tenant_id", "status", "limit")
    assert prepared.streamed is True
    assert prepare_query("INSERT INTO t VALUES (:a)").streamed is False
    assert prepare_query(r"SELECT '12\:30' AS t").bind_names == ()
    value = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "day": dt.date(2026, 1, 2),
        "amount": decimal.Decimal("12.30"),
        "blob": b"\x00\x01",
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "took": dt.timedelta(seconds=1.5),
        "tags": ("a", 1),
    }
    assert jsonable(value) == {
        "when": "2026-01-02T03:04:05+00:00",
        "day": "2026-01-02",
        "amount": "12.30",
        "blob": "AAE=",
        "id": "12345678-1234-5678-1234-567812345678",
        "took": 1.5,
        "tags": ["a", 1],
    }


# -- PostgreSQL -------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    candidates = ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust auth); its URL."""
    with _cluster() as url:
        yield url


@contextmanager
def _cluster(pki: _Pki | None = None) -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1; its URL. Trust auth without `pki`; with it, TLS
    only: database template1 trusts postgres, database postgres takes postgres's client certificate."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl in /usr/local/bin or /usr/lib/postgresql/*/bin)")
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
        runuser = shutil.which("runuser")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if runuser is None or owner is None:
            pytest.skip("running as root and there is no `postgres` user with runuser to own a cluster")
        prefix = [runuser, "-u", "postgres", "--"]
    # Not under tmp_path: pytest's base folder is private to root, the cluster's owner must reach it.
    base = Path(tempfile.mkdtemp(prefix="flowport-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    base.chmod(0o700)
    data = base / "data"
    port = _free_port()

    def tool(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, check=False)

    started = False
    try:
        init = tool(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--no-locale", "--no-sync")  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        if pki is not None:
            files = {"server.crt": pki.server_cert, "server.key": pki.server_key, "ca.crt": pki.ca_cert}
            hba = "hostssl template1 postgres 127.0.0.1/32 trust\nhostssl postgres postgres 127.0.0.1/32 cert\n"
            for name, text in [*((name, source.read_text()) for name, source in files.items()), ("pg_hba.conf", hba)]:
                path = data / name if name == "pg_hba.conf" else base / name
                path.write_text(text)
                path.chmod(0o600)
                if owner is not None:
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            options += (
                f" -c ssl=on -c ssl_cert_file={base}/server.crt -c ssl_key_file={base}/server.key"
                f" -c ssl_ca_file={base}/ca.crt"
            )
        start = tool(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o", options,
                     "start")  # fmt: skip
        started = start.returncode == 0
        log = (base / "log").read_text() if (base / "log").exists() else ""
        assert started, start.stdout + start.stderr + log
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            tool(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


async def test_seed_select_on_postgres(pools: SqlPools, postgres_url: str) -> None:
    ctx = make_ctx(pools)
    await create_records(ctx, postgres_url, id_column="SERIAL PRIMARY KEY")
    out = await run_sql(
        ctx,
        postgres_url,
        SEED_SELECT,
        AsyncSQLDatabaseNode(),
        query_params=SEED_PARAMS,
        session={"tenant_id": "acme"},
        pool_size=2,
        max_overflow=1,
    )
    assert [row["name"] for row in out["result"]["rows"]] == ["beta", "alpha"]
    assert out["result"]["columns"] == ["id", "name", "status", "tenant_id", "created_at"]
    # Injection attempts are values; typed values come back JSON-friendly.
    evil = await run_sql(ctx, postgres_url, SEED_SELECT, status="x' OR '1'='1", limit=100)
    assert evil["result"]["rows"] == []
    typed = await run_sql(
        ctx,
        postgres_url,
        "SELECT CAST(:n AS numeric) AS amount, TIMESTAMPTZ '2026-01-02 03:04:05+00' AS at, "
        "CAST('{\"a\": [1, 2]}' AS jsonb) AS doc, ARRAY[1, 2] AS nums",
        n="12.30",
    )
    assert typed["result"]["rows"] == [
        {"amount": "12.30", "at": "2026-01-02T03:04:05+00:00", "doc": {"a": [1, 2]}, "nums": [1, 2]}
    ]
    updated = await run_sql(ctx, postgres_url, "UPDATE enterprise_records SET status = 'done' WHERE tenant_id = 'acme'")
    assert updated["result"]["row_count"] == 3
    with pytest.raises(NodeError) as caught:
        await run_sql(ctx, postgres_url, "SELECT generate_series(1, 100) AS n", max_rows=10)
    assert caught.value.reason == "SQL_TOO_MANY_ROWS"
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools, timeout=0.5), postgres_url, "SELECT pg_sleep(30)")
    assert caught.value.reason == "SQL_TIMEOUT"
    assert (await run_sql(ctx, postgres_url, "SELECT 1 AS one"))["result"]["rows"] == [{"one": 1}]
    assert pools.engine(postgres_url) is pools.engine(postgres_url)


@pytest.mark.parametrize(
    ("connection", "query"),
    [
        ("sqlite:///file:{data}/flowport.db?uri=true", "SELECT 1"),
        ("sqlite:///app.db?uri=true", "SELECT 1"),
        ("sqlite:///:memory:", "ATTACH DATABASE '{data}/flowport.db' AS srv"),
        ("sqlite:///app.db", "attach database :p as srv"),
        ("sqlite:///{data}/flowport.db", "SELECT 1"),
    ],
)
async def test_sqlite_nodes_cannot_reach_the_servers_database(tmp_path: Path, connection: str, query: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    params = {
        "connection_string": connection.format(data=data),
        "query": query.format(data=data),
        "query_params": {"p": str(data / "flowport.db")},
    }
    pools = SqlPools(sqlite_root=data / "sqlite")
    ctx = NodeContext("t", "exe", "n", 1, 10.0, NodeServices(sql=pools))
    try:
        with pytest.raises(NodeError) as caught:
            await SQLDatabaseNode().run(ctx, None, params)
    finally:
        await pools.close()
    assert caught.value.reason in ("SQL_DATABASE_FORBIDDEN", "SQL_STATEMENT_FORBIDDEN")
    assert not (data / "flowport.db").exists()


OUTSIDE = [
    "sqlite:///{outside}/evil.pth",  # an absolute path: a .pth file runs code at the next interpreter start
    "sqlite:////{outside}/evil.pth",
    "sqlite:///../evil.pth",
    "sqlite:///../globex/app.db",  # another tenant's database
    "sqlite:///sub/app.db",
    "sqlite:///.hidden.db",
    "sqlite:///file:evil.pth",
    "sqlite:///app.db?vfs=unix-none",
]


@pytest.mark.parametrize("connection", OUTSIDE)
async def test_sqlite_files_live_only_in_the_tenants_folder(tmp_path: Path, connection: str) -> None:
    outside = tmp_path / "site-packages"
    outside.mkdir()
    root = tmp_path / "sqlite"
    connection = connection.format(outside=outside)
    # Known when the workflow is created: a 400 naming the field, without the path.
    violations = SQLDatabaseNode.validate_config({"connection_string": connection, "query": "SELECT 1"}, "n")
    assert [path for path, _ in violations] == ["n.connection_string"], violations
    message = violations[0][1]
    assert str(outside) not in message and "evil" not in message
    assert ("vfs" in message) if "vfs" in connection else ("tenant's own folder" in message), message
    # From an input (a ${name} reference): the node fails and creates nothing anywhere.
    pools = SqlPools(sqlite_root=root)
    try:
        with pytest.raises(NodeError) as caught:
            await run_sql(make_ctx(pools), connection, "CREATE TABLE t (x INTEGER)")
    finally:
        await pools.close()
    expected = "SQL_UNSUPPORTED_DATABASE" if "vfs" in connection else "SQL_DATABASE_FORBIDDEN"
    assert caught.value.reason == expected, caught.value.message
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil.pth").exists()
    assert [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] == []


async def test_each_tenant_has_its_own_sqlite_folder(tmp_path: Path) -> None:
    root = tmp_path / "sqlite"
    pools = SqlPools(sqlite_root=root)
    globex = NodeContext("globex", "exe_2", "db", 1, 10.0, NodeServices(sql=pools))
    odd = NodeContext("../acme", "exe_3", "db", 1, 10.0, NodeServices(sql=pools))
    try:
        await run_sql(make_ctx(pools), "sqlite:///app.db", "CREATE TABLE secrets (v TEXT)")
        await run_sql(make_ctx(pools), "sqlite:///app.db", "INSERT INTO secrets VALUES ('acme only')")
        # The same name in another tenant is another file.
        with pytest.raises(NodeError, match="no such table"):
            await run_sql(globex, "sqlite:///app.db", "SELECT v FROM secrets")
        # A tenant id is never a path: encoded into one folder name under the root.
        with pytest.raises(NodeError, match="no such table"):
            await run_sql(odd, "sqlite:///app.db", "SELECT v FROM secrets")
        assert (await run_sql(make_ctx(pools), "sqlite:///app.db", "SELECT v FROM secrets"))["result"]["rows"] == [
            {"v": "acme only"}
        ]
    finally:
        await pools.close()
    folders = sorted(p.name for p in root.iterdir())
    assert folders == ["acme", "globex", sqlite_folder(root, "../acme").name]
    assert sqlite_folder(root, "../acme").parent == root and "/" not in sqlite_folder(root, "../acme").name
    assert all((root / name / "app.db").is_file() for name in folders)
    assert stat.S_IMODE((root / "acme").stat().st_mode) == 0o700
    # Without a folder for them, a server opens no SQLite file at all; memory is fine.
    bare = SqlPools()
    try:
        with pytest.raises(NodeError) as caught:
            await run_sql(make_ctx(bare), "sqlite:///app.db", "SELECT 1")
        assert caught.value.reason == "SQL_DATABASE_FORBIDDEN"
        assert (await run_sql(make_ctx(bare), "sqlite:///:memory:", "SELECT 1 AS one"))["result"]["rows"] == [
            {"one": 1}
        ]
    finally:
        await bare.close()


async def test_a_symbolic_link_in_the_tenants_folder_is_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "sqlite"
    folder = root / "acme"
    folder.mkdir(parents=True)
    target = tmp_path / "authorized_keys"
    (folder / "linked.db").symlink_to(target)
    pools = SqlPools(sqlite_root=root)
    try:
        with pytest.raises(NodeError) as caught:
            await run_sql(make_ctx(pools), "sqlite:///linked.db", "CREATE TABLE t (x INTEGER)")
        assert caught.value.reason == "SQL_DATABASE_FORBIDDEN"
        # A link put in place after the pool was made: refused when the next connection opens.
        url = "sqlite:///later.db"
        await run_sql(make_ctx(pools), url, "SELECT 1")
        await pools.engine(url, tenant="acme").dispose()  # no pooled connection left
        (folder / "later.db").unlink()
        (folder / "later.db").symlink_to(target)
        with pytest.raises(NodeError) as caught:
            await run_sql(make_ctx(pools), url, "CREATE TABLE t (x INTEGER)")
        assert caught.value.reason == "SQL_DATABASE_FORBIDDEN", caught.value.message
    finally:
        await pools.close()
    assert not target.exists()


async def test_the_engine_cache_is_capped_and_keeps_engines_in_use(tmp_path: Path) -> None:
    pools = SqlPools(sqlite_root=tmp_path / "sqlite", max_engines_per_tenant=2, max_engines=3)
    try:
        first = pools.engine("sqlite:///a.db", tenant="acme")
        original = first.sync_engine.pool  # disposing swaps in a fresh pool object
        async with pools.using(first):
            async with first.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
            second = pools.engine("sqlite:///b.db", tenant="acme")
            pools.engine("sqlite:///c.db", tenant="acme")  # the tenant's third: the least recently used goes
            assert len(pools) == 2
            assert pools.engine("sqlite:///b.db", tenant="acme") is second
            await asyncio.sleep(0.05)
            assert first.sync_engine.pool is original, "disposed under a running statement"
            async with first.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        for _ in range(100):
            if first.sync_engine.pool is not original:
                break
            await asyncio.sleep(0.01)
        assert first.sync_engine.pool is not original, "not disposed after its last statement"
        # b was used after c: d pushes c out, not b.
        pools.engine("sqlite:///d.db", tenant="acme")
        assert pools.engine("sqlite:///b.db", tenant="acme") is second
        assert len(pools) == 2
        # The overall cap: another tenant's engine pushes out the least recently used of all.
        globex = pools.engine("sqlite:///:memory:", tenant="globex")
        assert len(pools) == 3
        pools.engine("sqlite:///:memory:", tenant="initech")
        assert len(pools) == 3
        assert pools.engine("sqlite:///:memory:", tenant="globex") is globex
        assert pools.engine("sqlite:///b.db", tenant="acme") is second
        # The node holds its engine while its statement runs, and leaves none held.
        await run_sql(make_ctx(pools), "sqlite:///e.db", "SELECT 1")
        assert not pools._users
    finally:
        await pools.close()


# -- the SSRF guard on SQL targets ----------------------------------------------------


def _sql_workflow(connection_string: str, query: str = "SELECT current_user AS who") -> dict[str, Any]:
    config = {"connection_string": connection_string, "query": query}
    return {"name": "sql", "nodes": [{"type": "SQLDatabaseNode", "name": "q", "config": config}]}


def _error(execution: execution_pb2.Execution) -> tuple[str, str, dict[str, str]]:
    """The failed execution's message, ErrorInfo reason and metadata."""
    assert execution.state == execution_pb2.Execution.STATE_FAILED, json_format.MessageToDict(execution.outputs)
    for detail in execution.error.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return execution.error.message, info.reason, dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {execution.error}")


@asynccontextmanager
async def _tenant_user(tmp_path: Path, **settings: object) -> AsyncIterator[AsyncClient]:
    """A server on `settings` and a client of it with a `user` key of tenant acme (not an admin)."""
    server = await start(make_settings(tmp_path / "data", **settings))
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as admin:
            key = await admin.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=["user"]))
            )
        async with AsyncClient(f"127.0.0.1:{server.port}", api_key=key.key) as user:
            yield user
    finally:
        await stop(server, 1.0)


async def test_sql_nodes_cannot_reach_internal_databases_unless_allowlisted(tmp_path: Path, postgres_url: str) -> None:
    port = make_url(postgres_url).port
    async with _tenant_user(tmp_path, sql_allowlist="") as user:
        # A superuser with trust auth on loopback: pg_read_file would read the server's files.
        for host in ("127.0.0.1", "[::1]", "localhost"):
            target = f"{host}:{port}"
            execution = await user.run_workflow(
                _sql_workflow(f"postgresql://postgres@{target}/postgres", "SELECT pg_read_file('/etc/hostname')")
            )
            message, reason, _ = _error(execution)
            assert reason == "SQL_UNAVAILABLE", (host, message)
            assert f"could not connect to the database at {target}" in message, message
            assert "allowlist" not in message and "loopback" not in message
        # A host name in the URL with the real target in the query's host= is checked by the latter.
        hidden = await user.run_workflow(
            _sql_workflow(f"postgresql://postgres@db.invalid/postgres?host=127.0.0.1&port={port}")
        )
        assert _error(hidden)[1] == "SQL_UNAVAILABLE"
        # Unix sockets and parameters that read files here are refused before any connection: when the
        # workflow is created (400 naming the field), or when the node runs with the string from an input.
        for refused in (
            "postgresql://postgres@/postgres",
            f"postgresql://postgres@/postgres?host=/var/run/postgresql&port={port}",
            f"postgresql://postgres@127.0.0.1:{port}/postgres?passfile=/root/.pgpass",
            f"postgresql://postgres@db.invalid:{port}/postgres?dsn=postgresql://127.0.0.1/postgres",
        ):
            with pytest.raises(ApiError) as invalid:
                await user.run_workflow(_sql_workflow(refused))
            assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused
            assert [f for f, _ in invalid.value.violations] == ["nodes[0].config.connection_string"]
            # An input keyed by the node's name overrides its config.
            from_input = _sql_workflow("sqlite:///:memory:")
            message, reason, _ = _error(await user.run_workflow(from_input, {"q": {"connection_string": refused}}))
            assert reason == "SQL_UNSUPPORTED_DATABASE", (refused, message)
    # Allowlisted, the same workflow runs.
    async with _tenant_user(tmp_path / "allowed", sql_allowlist="127.0.0.1") as user:
        allowed = await user.run_workflow(_sql_workflow(f"postgresql://postgres@127.0.0.1:{port}/postgres"))
        assert allowed.state == execution_pb2.Execution.STATE_SUCCEEDED, allowed.error.message


async def test_connection_failures_look_the_same_whatever_the_cause(tmp_path: Path, postgres_url: str) -> None:
    port = make_url(postgres_url).port
    targets = {
        "closed port": f"127.0.0.1:{free_port()}",  # allowlisted, nothing listens
        "unknown role": f"127.0.0.1:{port}",  # allowlisted, the server rejects the user
        "refused loopback": f"[::1]:{port}",  # not allowlisted: never connected to
        "refused private": "10.1.2.3:5432",
        "refused link-local": "169.254.169.254:5432",
    }
    async with _tenant_user(tmp_path, sql_allowlist="127.0.0.1") as user:
        seen = {}
        for cause, target in targets.items():
            execution = await user.run_workflow(_sql_workflow(f"postgresql://nobody@{target}/postgres"))
            message, reason, metadata = _error(execution)
            seen[cause] = (message.replace(target, "<target>"), reason, metadata)
    first = next(iter(seen.values()))
    assert "could not connect to the database at <target>" in first[0]
    assert all(outcome == first for outcome in seen.values()), seen
    # None of the driver's words that tell the causes apart.
    for word in ("refused", "role", "nobody", "allowlist", "Errno", "timed out"):
        assert word not in first[0], first[0]


async def test_connections_are_pinned_to_the_checked_address(
    pools: SqlPools, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = make_url(postgres_url).port
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        # db.test answers the allowlisted database first, then another loopback address
        # (nothing listens there): a driver that resolved again would not reach the database.
        if host == "db.test":
            lookups.append(host)
            host = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return real(host, *args, **kwargs)

    # Every lookup: the guard's (in the resolver's threads) and a driver's (the loop's executor).
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"postgresql://postgres@db.test:{port}/postgres"
    # The name is resolved and checked: its loopback answer is refused without an allowlist...
    strict = SqlPools()
    try:
        with pytest.raises(NodeError) as caught:
            await run_sql(make_ctx(strict), url, "SELECT 1 AS one")
    finally:
        await strict.close()
    assert caught.value.reason == "SQL_UNAVAILABLE"
    # ...and with 127.0.0.1 allowlisted, the connection goes to the address that was checked.
    lookups.clear()
    out = await run_sql(make_ctx(pools), url, "SELECT 1 AS one")
    assert out["result"]["rows"] == [{"one": 1}]
    assert lookups == ["db.test"]  # the guard's lookup only: the driver was given the address


async def test_pin_connection_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    def public(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port))]

    monkeypatch.setattr(socket, "getaddrinfo", public)
    monkeypatch.setenv("PGPASSWORD", "the-servers-own")
    plain: dict[str, Any] = {"host": "db.example", "user": "u", "database": "d"}
    assert await pin_connection(plain, frozenset()) is True  # prefer: TLS if the server has it
    # The address that was checked, an explicit port, and not the server's password from its environment.
    assert (plain["host"], plain["port"], plain["password"]) == ("8.8.8.8", 5432, "")
    assert isinstance(plain["ssl"], ssl.SSLContext) and plain["ssl"].verify_mode == ssl.CERT_NONE
    verified: dict[str, Any] = {"host": "db.example", "port": 6432, "ssl": "verify-full", "user": "u", "database": "d"}
    assert await pin_connection(verified, frozenset()) is False
    # Pinned too: the certificate is checked against the name the address came from.
    assert (verified["host"], verified["port"]) == ("8.8.8.8", 6432)
    context = verified["ssl"]
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="8.8.8.8").server_hostname == "db.example"
    several: dict[str, Any] = {"host": ["a.example", "b.example"], "port": [5432, 5433], "user": "u", "database": "d"}
    await pin_connection(several, frozenset())
    assert several["host"] == ["8.8.8.8", "8.8.8.8"] and several["port"] == [5432, 5433]
    with pytest.raises(TargetRefused, match=r"not allowlisted \(--sql-allowlist\)"):
        await pin_connection({"host": "fd00::1", "user": "u", "database": "d"}, frozenset())
    disabled: dict[str, Any] = {"host": "db.example", "ssl": "disable", "user": "u", "database": "d"}
    assert await pin_connection(disabled, frozenset()) is False and disabled["ssl"] is False


@pytest.mark.parametrize(
    ("connection", "missing"),
    [
        ("postgresql://db.example/app", "a user"),
        ("postgresql://app@db.example", "a database"),
        ("postgresql://app:pw@db.example:5432/", "a database"),
    ],
)
async def test_a_postgres_connection_names_its_user_and_database(
    pools: SqlPools, connection: str, missing: str
) -> None:
    # Else the driver would take PGUSER, the server's OS user name or PGDATABASE.
    violations = SQLDatabaseNode.validate_config({"connection_string": connection, "query": "SELECT 1"}, "n")
    assert [(path, missing in text) for path, text in violations] == [("n.connection_string", True)], violations
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools), connection, "SELECT 1")
    assert caught.value.reason == "SQL_UNSUPPORTED_DATABASE" and missing in caught.value.message
    for bad in ("?ssl=verify-nothing", "?direct_tls=maybe", "?direct_tls=true&ssl=prefer"):
        assert SQLDatabaseNode.validate_config(
            {"connection_string": f"postgresql://app@db.example/app{bad}", "query": "SELECT 1"}, "n"
        ), bad


def _poison_environment(monkeypatch: pytest.MonkeyPatch, home: Path, cert: Path, key: Path) -> None:
    """The server's own PostgreSQL client settings, as an operator may have them."""
    postgresql = home / ".postgresql"
    postgresql.mkdir(parents=True)
    for name, source in (("postgresql.crt", cert), ("postgresql.key", key), ("root.crt", cert)):
        (postgresql / name).write_bytes(source.read_bytes())
    (home / ".pgpass").write_text("*:*:*:*:the-servers-password\n")
    (home / ".pgpass").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    for name, value in {
        "PGSSLCERT": str(cert),
        "PGSSLKEY": str(key),
        "PGSSLROOTCERT": str(cert),
        "PGSSLMODE": "verify-ca",
        "PGSSLNEGOTIATION": "direct",
        "PGUSER": "postgres",
        "PGDATABASE": "postgres",
        "PGPASSWORD": "the-servers-password",
        "PGTARGETSESSIONATTRS": "read-write",
        "PGKRBSRVNAME": "gateway",
        "PGGSSLIB": "sspi",
    }.items():
        monkeypatch.setenv(name, value)


async def test_tenant_connections_take_nothing_from_the_servers_environment(
    pools: SqlPools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncpg
    from asyncpg import connect_utils

    pki = _pki(tmp_path / "pki")
    _poison_environment(monkeypatch, tmp_path / "home", pki.client_cert, pki.client_key)

    def public(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port))]

    given: list[dict[str, Any]] = []

    async def connect(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs)
        raise ConnectionRefusedError("not connecting anywhere")

    monkeypatch.setattr(socket, "getaddrinfo", public)
    monkeypatch.setattr(asyncpg, "connect", connect)
    with pytest.raises(NodeError):
        await run_sql(make_ctx(pools), "postgresql://app@db.example/app", "SELECT 1")
    [arguments] = given
    # What asyncpg makes of these arguments with the poisoned environment and home directory.
    addresses, params = connect_utils._parse_connect_dsn_and_args(
        dsn=None,
        host=arguments["host"],
        port=arguments["port"],
        user=arguments["user"],
        password=arguments["password"],
        passfile=None,
        database=arguments["database"],
        ssl=arguments["ssl"],
        service=None,
        servicefile=None,
        direct_tls=arguments["direct_tls"],
        server_settings=None,
        target_session_attrs=arguments["target_session_attrs"],
        krbsrvname=arguments["krbsrvname"],
        gsslib=arguments["gsslib"],
    )
    assert addresses == [("8.8.8.8", 5432)]
    assert (params.user, params.database, params.password) == ("app", "app", "")
    # Our context as it is (asyncpg loads PGSSLCERT or ~/.postgresql only into a context it makes itself).
    assert params.ssl is arguments["ssl"] and params.ssl.verify_mode == ssl.CERT_NONE
    assert params.ssl.get_ca_certs() == []
    assert params.ssl_negotiation is connect_utils.SSLNegotiation.postgres
    assert str(params.target_session_attrs.value) == "any"
    assert (params.krbsrvname, params.gsslib) == ("postgres", "gssapi")


# -- TLS: a throw-away PostgreSQL with certificates --------------------------------------


@dataclass(frozen=True)
class _Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=postgres: the server's own identity for certificate authentication
    client_key: Path


def _pki(folder: Path) -> _Pki:
    """A test CA, a server certificate for db.test and a client certificate for the role postgres."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.with_suffix(".key").chmod(0o600)
        return path.with_suffix(".crt"), path.with_suffix(".key")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("flowport test CA"))
        .issuer_name(name("flowport test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_cert, _ = write(folder / "ca", ca_key, ca)

    def issue(common: str, dns: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if dns:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_cert, server_key = write(folder / "server", *issue("db.test", ["db.test"]))
    client_cert, client_key = write(folder / "client", *issue("postgres", []))
    return _Pki(ca_cert, server_cert, server_key, client_cert, client_key)


@pytest.fixture
def tls_postgres(tmp_path: Path) -> Iterator[tuple[str, _Pki]]:
    """A TLS-only PostgreSQL (see _cluster) and its certificates."""
    pki = _pki(tmp_path / "pki")
    with _cluster(pki) as url:
        yield url, pki


async def test_a_tenant_never_connects_with_the_servers_client_certificate(
    pools: SqlPools, tls_postgres: tuple[str, _Pki], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, pki = tls_postgres
    port = make_url(url).port
    home = tmp_path / "home" / ".postgresql"
    home.mkdir(parents=True)
    for name, source in (("postgresql.crt", pki.client_cert), ("postgresql.key", pki.client_key)):
        (home / name).write_bytes(source.read_bytes())
        (home / name).chmod(0o600)
    # The gateway's own certificate for the role postgres, as libpq and asyncpg would find it.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PGSSLCERT", str(pki.client_cert))
    monkeypatch.setenv("PGSSLKEY", str(pki.client_key))
    monkeypatch.setenv("PGSSLROOTCERT", str(pki.ca_cert))
    monkeypatch.setenv("PGSSLMODE", "verify-ca")
    # TLS works (template1 trusts postgres over TLS, our context and no certificate)...
    out = await run_sql(make_ctx(pools), f"postgresql://postgres@127.0.0.1:{port}/template1", "SELECT 1 AS one")
    assert out["result"]["rows"] == [{"one": 1}]
    # ...and the database that authenticates postgres by certificate gets none from a tenant's node.
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools), f"postgresql://postgres@127.0.0.1:{port}/postgres", "SELECT current_user")
    assert caught.value.reason == "SQL_UNAVAILABLE", caught.value.message


async def test_verify_full_connects_to_the_checked_address_and_checks_the_name(
    pools: SqlPools, tls_postgres: tuple[str, _Pki], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, pki = tls_postgres
    port = make_url(url).port
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))  # the system's CAs, as far as this test goes
    monkeypatch.setenv("PGSSLROOTCERT", str(pki.ca_cert))  # where a driver left to itself would look
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        # db.test answers the database first, then another loopback address where nothing listens:
        # a driver that resolved the name again would connect there.
        if host in ("db.test", "other.test"):
            lookups.append(host)
            host = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    out = await run_sql(make_ctx(pools), f"postgresql://postgres@db.test:{port}/template1?ssl=verify-full", query)
    assert out["result"]["rows"] == [{"ssl": True}]
    assert lookups == ["db.test"]  # the guard's lookup only: the driver was given the address
    # The certificate is still checked against the name: one for db.test does not pass for other.test.
    lookups.clear()
    with pytest.raises(NodeError) as caught:
        await run_sql(make_ctx(pools), f"postgresql://postgres@other.test:{port}/template1?ssl=verify-full", query)
    assert caught.value.reason == "SQL_UNAVAILABLE"
    lookups.clear()
    out = await run_sql(make_ctx(pools), f"postgresql://postgres@other.test:{port}/template1?ssl=verify-ca", query)
    assert out["result"]["rows"] == [{"ssl": True}]


def test_the_sqlite_dir_setting(tmp_path: Path) -> None:
    assert make_settings(tmp_path / "data").sqlite_root == tmp_path / "data" / "sqlite"
    assert make_settings(tmp_path / "data", sqlite_dir=tmp_path / "tenants").sqlite_root == tmp_path / "tenants"
    # A tenant's folder must never be the data dir (a tenant named like a folder of the server's).
    for overlapping in (tmp_path / "data", tmp_path):
        with pytest.raises(ValueError, match="sqlite_dir"):
            make_settings(tmp_path / "data", sqlite_dir=overlapping)


async def test_a_tenants_sqlite_databases_are_bounded_in_the_server_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite runs in the server: a database grows to its cap and no further (a write past it fails
    as on a full disk, in memory as on file), a tenant keeps a bounded number of files, and a pool
    asks for no more connections (threads) than its cap."""
    monkeypatch.setattr(sql_pools, "SQLITE_FILE_BYTES", 512 * 1024)
    monkeypatch.setattr(sql_pools, "SQLITE_MEMORY_BYTES", 256 * 1024)
    monkeypatch.setattr(sql_pools, "SQLITE_FILES_PER_TENANT", 3)
    pools = SqlPools(sqlite_root=tmp_path / "sqlite")
    ctx = make_ctx(pools)
    fill = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)"
        " INSERT INTO blobs SELECT randomblob(1024) FROM n"
    )
    try:
        for url in ("sqlite:///big.db", "sqlite:///:memory:"):
            await run_sql(ctx, url, "CREATE TABLE blobs (b BLOB)")
            with pytest.raises(NodeError, match="full"):
                await run_sql(ctx, url, fill)
            # What fits still goes in.
            await run_sql(ctx, url, "INSERT INTO blobs VALUES (randomblob(10))")
        assert (tmp_path / "sqlite" / "acme" / "big.db").stat().st_size <= 512 * 1024
        # A statement can lift none of it: no pragma that sets something, and TEMP tables are bounded too.
        for lift in ("PRAGMA max_page_count = 1000000", "PRAGMA main.max_page_count(1000000)", "PRAGMA temp_store = 2"):
            with pytest.raises(NodeError, match="not authorized"):
                await run_sql(ctx, "sqlite:///big.db", lift)
        await run_sql(ctx, "sqlite:///big.db", "CREATE TEMP TABLE scratch (b BLOB)")
        with pytest.raises(NodeError, match="full"):
            await run_sql(ctx, "sqlite:///big.db", fill.replace("INSERT INTO blobs", "INSERT INTO scratch"))
        assert (await run_sql(ctx, "sqlite:///big.db", "PRAGMA table_info(blobs)"))["result"]["rows"][0]["name"] == "b"
        await run_sql(ctx, "sqlite:///big.db", "PRAGMA foreign_keys = ON")
        # No value past SQLITE_MAX_VALUE_BYTES, even one the answer never holds (a one-row length).
        with pytest.raises(NodeError, match="too big"):
            await run_sql(ctx, "sqlite:///big.db", "SELECT length(randomblob(:n)) AS n", n=17 * 2**20)
        small = await run_sql(ctx, "sqlite:///big.db", "SELECT length(randomblob(:n)) AS n", n=2**20)
        assert small["result"]["rows"] == [{"n": 2**20}]
        await run_sql(ctx, "sqlite:///two.db", "SELECT 1")
        await run_sql(ctx, "sqlite:///three.db", "SELECT 1")
        with pytest.raises(NodeError) as caught:
            await run_sql(ctx, "sqlite:///four.db", "SELECT 1")
        assert caught.value.reason == "SQL_DATABASE_FORBIDDEN" and "most of 3 SQLite databases" in caught.value.message
        await run_sql(ctx, "sqlite:///two.db", "SELECT 1")  # the ones it has stay open to it
        engine = pools.engine("sqlite:///two.db", pool_size=100, max_overflow=200, tenant="acme")
        assert engine.pool.size() + engine.pool._max_overflow <= sql_pools.SQLITE_POOL_CONNECTIONS  # type: ignore[attr-defined]
    finally:
        await pools.close()


@pytest.mark.timeout(90)
async def test_a_statement_spilling_to_temporary_files_stops_at_the_disk_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ORDER BY over a recursive CTE that never ends writes its sorter to SQLite's temporary files
    until the node's timeout. With the reserve set to what is free now less 64 MiB, the statement's
    own files bring the disk down to it, and it stops, of narrow rows or of wide ones (few SQLite
    steps a row); with room, a sort that spills runs."""
    directory = sqlite_temp_space.temp_directory()
    found = os.statvfs(directory)
    free = found.f_bavail * found.f_frsize
    monkeypatch.setattr(sqlite_temp_space, "reserve_bytes", lambda total: free - 64 * 2**20)
    pools = SqlPools(sqlite_root=tmp_path / "sqlite")
    endless = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT randomblob(1000) AS b FROM n ORDER BY b"
    )
    wide = endless.replace("randomblob(1000)", "randomblob(4000000)")
    try:
        for url, query in (("sqlite:///spill.db", endless), ("sqlite:///:memory:", endless), ("sqlite:///w.db", wide)):
            with pytest.raises(NodeError) as caught:
                await run_sql(make_ctx(pools, timeout=60), url, query)
            assert caught.value.reason == "SQL_TEMP_SPACE" and not caught.value.retryable, caught.value
            assert "temporary files" in caught.value.message
        # The files are gone with the statement, and a sort that spills (20 MB past a 2 MB cache) runs.
        monkeypatch.setattr(sqlite_temp_space, "reserve_bytes", lambda total: 0)
        finite = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
            " SELECT count(*) AS c FROM (SELECT randomblob(1000) AS b FROM n ORDER BY b)"
        )
        sorted_ = await run_sql(make_ctx(pools, timeout=60), "sqlite:///spill.db", finite)
        assert sorted_["result"]["rows"] == [{"c": 20000}]
    finally:
        await pools.close()


def test_the_temporary_files_reserve() -> None:
    assert sqlite_temp_space.reserve_bytes(10 * 2**30) == int(0.05 * 10 * 2**30)
    assert sqlite_temp_space.reserve_bytes(2**40) == sqlite_temp_space.RESERVE_BYTES
    assert os.access(sqlite_temp_space.temp_directory(), os.W_OK)
    assert not sqlite_temp_space.below_reserve("/nonexistent/folder")


def test_sqlite_names_given_before_their_files_exist_count_toward_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is made by its first connection, after the name was checked: runs started together
    must not each see room that the others are about to take."""
    monkeypatch.setattr(sql_pools, "SQLITE_FILES_PER_TENANT", 3)
    pools = SqlPools(sqlite_root=tmp_path / "sqlite")
    for name in ("a.db", "b.db", "c.db"):
        pools.tenant_url(make_url(f"sqlite+aiosqlite:///{name}"), "acme")
    assert not list((tmp_path / "sqlite" / "acme").iterdir()), "no file is made before a connection"
    with pytest.raises(ForbiddenDatabase, match="most of 3 SQLite databases"):
        pools.tenant_url(make_url("sqlite+aiosqlite:///d.db"), "acme")
    pools.tenant_url(make_url("sqlite+aiosqlite:///b.db"), "acme")  # a name it was given stays its own
    pools.tenant_url(make_url("sqlite+aiosqlite:///d.db"), "globex")  # and other tenants keep their room


def test_a_pool_of_a_tenants_postgresql_is_capped() -> None:
    sizes = sql_pools._pool_sizes(make_url("postgresql+asyncpg://u@db.example.com/app"), 100, 200)
    assert sizes == {"pool_size": sql_pools.MAX_POOL_CONNECTIONS, "max_overflow": 0}
    assert sql_pools._pool_sizes(make_url("postgresql+asyncpg://u@h/d"), 5, 10) == {"pool_size": 5, "max_overflow": 10}


async def test_a_sql_nodes_binds_share_one_substitution_budget(tmp_path: Path) -> None:
    """200 binds each of "a${big}" (a 3 MB input written out) made 600 M characters, one budget
    per bind; they share one now, and the sixth passes it."""
    written: list[int] = []

    class Counted(list[int]):
        def __str__(self) -> str:
            written.append(1)
            return super().__str__()

    pools = SqlPools(sqlite_root=tmp_path / "sqlite")
    try:
        binds = {f"p{n}": "a${big}" for n in range(200)}
        query = "SELECT " + ", ".join(f":p{n} AS c{n}" for n in range(200))
        with pytest.raises(NodeError) as caught:
            await run_sql(
                make_ctx(pools), "sqlite:///:memory:", query, query_params=binds, big=Counted([1] * 1_000_000)
            )
        assert caught.value.reason == "SUBSTITUTION_TOO_LARGE" and len(written) == 6, len(written)
    finally:
        await pools.close()
