"""SQL node types: `SQLDatabaseNode` and `AsyncSQLDatabaseNode` (the seed's
async name; both share this implementation and behave the same).

Queries are parameterised only. The query names its parameters `:name`
(SQLAlchemy `text()`); the driver binds the values, which are never
formatted into the SQL. Each bind parameter's value comes from
`query_params` (or its older name `parameters`; values there may be
`${name}` references, resolved from the node's parameters) or else from a
node parameter with the same name; a parameter found in neither fails with
`SQL_MISSING_PARAMETER`. A literal colon that is not a parameter is written
`\\:` (text() does not look inside quotes).

`:tenant_id`, `:session_id`, `:execution_id` and `:workflow_id` are the
execution's own, as they are in PythonCodeNode code (the same values, from
the run: python_code.own_variables): never a parameter's, so an input, a
connection, or a `query_params` an input or a connection gives, cannot pose
as another tenant (`WHERE tenant_id = :tenant_id` on a shared table). Only
the node's config may map one of them otherwise, in its `query_params` or
`parameters`: `{"tenant_id": "${session.tenant_id}"}` (the execution's
again, as `${tenant_id}` in a config always is) or anything else the
workflow's author chose (`"${customer_tenant}"`, a value). They are never
required inputs of the workflow.

The statement runs in its own transaction on a pooled connection from
`ctx.services.sql` (shared engines): committed when it succeeds, rolled back
when it fails or returns more than `max_rows` rows (`SQL_TOO_MANY_ROWS`).
Queries (SELECT, WITH, VALUES, …) are read through a server-side cursor, so
a large result is not loaded before the cap applies; other statements run
buffered so the driver reports the affected row count. The whole call is
bounded by `ctx.remaining` (`SQL_TIMEOUT`): on PostgreSQL `statement_timeout`
is set for the transaction so the server stops the query too, and on SQLite
the running statement is interrupted at the deadline. A SQLite statement
also stops (`SQL_TEMP_SPACE`) once the disk of SQLite's temporary files is
down to its reserve (sqlite_temp_space.py).

Outputs, the same shape for every statement:

    result    = {"rows": [{column: value, …}, …], "row_count": n, "columns": [name, …]}
    rows      = result["rows"]
    row_count = result["row_count"]

For statements that return rows (SELECT, … RETURNING) `row_count` is the
number of rows; for other statements `rows` and `columns` are empty and
`row_count` is the driver's count of affected rows (-1 when unknown, e.g.
DDL). Values are JSON-friendly: datetime/date/time as ISO 8601 strings,
Decimal as a string (exact; convert with float() if you need a number),
bytes as base64, UUID as a string, timedelta as seconds (float), JSON and
array columns as JSON values; other driver types are str()-ed. When two
columns share a name the last one wins in the row objects.

`${secret:NAME}` is resolved in `connection_string` (e.g. the password)
and in `query_params`/`parameters`, never in the query itself: a secret
reaches SQL only as a bound value. Rows that return one have it masked.

`echo` is accepted for compatibility and ignored: SQL logging would log
bound values, and engines are shared between workflows.

A SQLite database is a file in the tenant's own folder (`sqlite:///name.db`)
or `:memory:`; a PostgreSQL connection string names its user and database.
PostgreSQL targets go through the SSRF guard (server/nodes/sql_pools.py):
internal addresses only with `--sql-allowlist`. Every failure to connect
(a refused or unresolvable target, a closed or filtered port, rejected
credentials, an unknown database) fails the node the same way:
`SQL_UNAVAILABLE` (retryable), "could not connect to the database at
host:port", without the driver's text, so that a node cannot tell them
apart and probe the network with it; the cause goes to the server log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

from flowport.server.nodes.base import MAX_OUTPUT_BYTES, JsonSchema, NodeContext, NodeError, NodeType, Violation
from flowport.server.nodes.python_code import own_variables
from flowport.server.nodes.sql_pools import (
    CONNECTION_STRING_PATTERN,
    ForbiddenDatabase,
    UnsupportedDatabase,
    async_url,
    connect_arguments,
    describe,
    postgres_targets,
)
from flowport.server.nodes.sqlite_temp_space import CHECK_SECONDS, below_reserve
from flowport.server.nodes.substitution import EXECUTION_VARIABLE_NAMES, Budget, check_params, substitute
from flowport.server.observability import tracing
from flowport.server.resources.pinning import ABSENT, pinned_to_config
from flowport.server.secrets.references import insert_secrets, stand_in
from flowport.server.secrets.resolver import NONE, ConfigSecrets, Revealed, masking, revealed

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.sql.elements import TextClause

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS: Final = 10_000
DEADLINE_MARGIN: Final = 0.05  # seconds
_QUERY_CANCELED: Final = "57014"  # PostgreSQL SQLSTATE of a statement_timeout
# Statements that read (after leading comments): fetched through a server-side cursor. The comments
# are skipped one at a time, each by an unambiguous pattern: `/\*.*?\*/` repeated could split a
# run of "/**/" in exponentially many ways, and a 161-byte query would hold the event loop for days.
_LEADING_COMMENT = re.compile(r"\s*(?:--[^\n]*(?:\n|$)|/\*(?:[^*]|\*(?!/))*\*/)")
_READ_KEYWORD = re.compile(r"\s*\(?\s*(?:select|with|values|show|table|explain|pragma)\b", re.IGNORECASE)


def _reads(query: str) -> bool:
    """Whether `query` is a statement that reads, after any leading comments."""
    at = 0
    while (comment := _LEADING_COMMENT.match(query, at)) is not None and comment.end() > at:
        at = comment.end()
    return _READ_KEYWORD.match(query, at) is not None


MAX_MAX_ROWS: Final = 100_000
# With a resource, the statement and the database come from the workflow's config only.
SQL_RESOURCE_PINNED: Final = ("resource_name", "query")

_CONFIG_SCHEMA: JsonSchema = {
    "type": "object",
    "properties": {
        "connection_string": {
            "type": "string",
            "pattern": CONNECTION_STRING_PATTERN,
            "description": "sqlite:///name.db (a file in the tenant's own folder; no paths) or sqlite:///:memory:, "
            "or postgresql://user:pass@host:port/db (user and database required)",
        },
        "resource_name": {
            "type": "string",
            "pattern": r"^[a-z0-9][a-z0-9_-]{0,62}$",
            "description": "A database resource of the tenant (/api/resources) instead of connection_string: "
            "its shared pool and its settings (pool_size, max_overflow, pool_recycle here are ignored).",
        },
        "query": {"type": "string", "minLength": 1, "description": "One SQL statement with :name parameters."},
        "query_params": {
            "type": "object",
            "description": "Values for the query's :name parameters; may hold ${name} references. "
            ":tenant_id, :session_id, :execution_id and :workflow_id are the execution's unless the "
            "workflow's config maps them here.",
        },
        "parameters": {"type": "object", "description": "Same as query_params (which wins on a shared name)."},
        "max_rows": {"type": "integer", "minimum": 1, "maximum": MAX_MAX_ROWS, "default": DEFAULT_MAX_ROWS},
        "pool_size": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
        "max_overflow": {"type": "integer", "minimum": 0, "maximum": 200, "default": 10},
        "pool_recycle": {"type": "integer", "minimum": -1, "default": 3600, "description": "Seconds; -1 never."},
        "echo": {"type": "boolean", "description": "Accepted and ignored (SQL logging is not per node)."},
    },
    "required": ["query"],
    "additionalProperties": False,
}

_ROWS_SCHEMA: JsonSchema = {"type": "array", "items": {"type": "object"}}
_RESULT_SCHEMA: JsonSchema = {
    "type": "object",
    "properties": {
        "rows": _ROWS_SCHEMA,
        "row_count": {"type": "integer", "description": "Rows returned, or rows affected by a write (-1: unknown)."},
        "columns": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["rows", "row_count", "columns"],
}


@dataclass(frozen=True)
class PreparedQuery:
    """A query compiled once per workflow version."""

    query: str
    statement: TextClause
    bind_names: tuple[str, ...]
    # Read through a server-side cursor (queries); writes run buffered so the
    # driver reports the affected row count.
    streamed: bool


@dataclass(frozen=True)
class PreparedSql:
    """What a SQL node keeps per workflow version: its compiled query (None when it
    does not parse; run reports that) and its config values that reference secrets."""

    query: PreparedQuery | None
    secrets: ConfigSecrets
    # With a resource: the config's resource_name and query, which inputs may not change.
    pinned: Mapping[str, Any] = field(default_factory=dict)
    # The config's own mappings of the execution's variables (query_params' `tenant_id`, ...).
    own_binds: Mapping[str, tuple[str, Any]] = field(default_factory=dict)


def prepare_query(query: str) -> PreparedQuery:
    """`query` as a text() clause and the names of its bind parameters, in order."""
    # SQLAlchemy loads with the first SQL node compiled, not at start.
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        statement = text(query)
        names = tuple(statement.compile().params)
    except SQLAlchemyError as exc:
        raise NodeError(f"cannot parse the query: {exc}", reason="SQL_INVALID_QUERY") from exc
    return PreparedQuery(query, statement, names, _reads(query))


def explicit_binds(params: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Bind name -> (the key it came from, its value), from query_params (which wins) and parameters."""
    explicit: dict[str, tuple[str, Any]] = {}
    for key in ("parameters", "query_params"):
        given = params.get(key)
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise NodeError(f"{key} must be an object, got {type(given).__name__}", reason="INVALID_PARAMETER")
        explicit.update((name, (key, value)) for name, value in given.items())
    return explicit


def own_binds(config: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """The config's explicit mappings of the execution's variables (a malformed mapping maps none)."""
    try:
        explicit = explicit_binds(config)
    except NodeError:  # reported when the node runs
        return {}
    return {name: explicit[name] for name in EXECUTION_VARIABLE_NAMES if name in explicit}


def bind_values(
    prepared: PreparedQuery,
    params: Mapping[str, Any],
    secrets: Revealed = NONE,
    *,
    own: Mapping[str, Any] | None = None,
    configured: Mapping[str, tuple[str, Any]] | None = None,
) -> dict[str, Any]:
    """A value for each bind parameter: query_params/parameters (substituted), else the parameter itself;
    but the execution's variables (`:tenant_id`, ...) from `own`, unless the node's config maps them
    (`configured`, from `own_binds`): never from a parameter, nor from a query_params that is not the config's.
    """
    explicit = explicit_binds(params)
    configured = configured or {}
    own = own or {}
    values: dict[str, Any] = {}
    budget = Budget()  # one for all the binds: each of 200 binds made 3 MB of one input
    for name in prepared.bind_names:
        # An execution variable is mapped by the config alone, else the execution's; any other name
        # by query_params/parameters, else the parameter of its name.
        execution_own = name in EXECUTION_VARIABLE_NAMES
        mapped, given = (configured, own) if execution_own else (explicit, params)
        if name in mapped:
            key, value = mapped[name]
            values[name] = substitute(value, params, secrets.for_key(key), budget)
        elif name in given:
            values[name] = given[name]
        elif execution_own:
            raise NodeError(
                f"query parameter :{name} is the execution's own, and this node runs outside an execution",
                reason="SQL_MISSING_PARAMETER",
            )
        else:
            raise NodeError(
                f"query parameter :{name} has no value (give it in query_params or as a parameter named {name!r})",
                reason="SQL_MISSING_PARAMETER",
            )
    return values


def jsonable(value: Any) -> Any:
    """A database value as a JSON-friendly value (see the module docstring)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    for kind, convert in _CONVERTERS:
        if isinstance(value, kind):
            return convert(value)
    return str(value)


_CONVERTERS: tuple[tuple[type | tuple[type, ...], Callable[[Any], Any]], ...] = (
    ((dt.datetime, dt.date, dt.time), lambda value: value.isoformat()),
    (decimal.Decimal, str),
    ((bytes, bytearray, memoryview), lambda value: base64.b64encode(bytes(value)).decode("ascii")),
    (uuid.UUID, str),
    (dt.timedelta, lambda value: value.total_seconds()),
)


class _TooManyRows(Exception):
    pass


class _TooLarge(Exception):
    pass


# Rows fetched at most at once; fewer as the rows seen so far are large (see _execute).
FETCH_BATCH = 1000
# Rows a streamed (server-side) cursor reads ahead of what was fetched.
STREAM_BUFFER = 16


def _json_size(value: Any) -> int:
    """About what a converted value adds to the outputs, in UTF-8 bytes."""
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))) + 2
    if isinstance(value, dict):
        return sum(_json_size(key) + _json_size(item) for key, item in value.items()) + 2
    if isinstance(value, list):
        return sum(_json_size(item) for item in value) + 2
    return 8


def _execute(
    conn: Connection, prepared: PreparedQuery, values: dict[str, Any], max_rows: int, timeout_ms: int | None
) -> dict[str, Any]:
    """Run on the sync side of an AsyncConnection, inside its transaction."""
    from sqlalchemy import text

    if timeout_ms is not None:
        conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(timeout_ms)})
    statement = prepared.statement
    if prepared.streamed:
        statement = statement.execution_options(stream_results=True, max_row_buffer=STREAM_BUFFER)
    result = conn.execute(statement, values)
    try:
        if not result.returns_rows:
            return {"rows": [], "row_count": result.rowcount, "columns": []}
        columns = list(result.keys())
        rows: list[dict[str, Any]] = []
        # Fetched a batch at a time, each no larger than what the rows seen so far say still fits
        # (one row first), and stopped once they outgrow a node's outputs: a query of many large
        # values fails before the server holds them all. (A single value is read whole, and a
        # write's RETURNING rows arrive together: the driver gives them at once.)
        keys = sum(_json_size(column) for column in columns)
        size = largest = 0
        want = 1
        while batch := result.fetchmany(min(want, max_rows + 1 - len(rows))):
            for row in batch:
                converted = {column: jsonable(value) for column, value in zip(columns, row, strict=True)}
                row_size = keys + sum(_json_size(value) for value in converted.values())
                largest = max(largest, row_size)
                size += row_size
                if size > MAX_OUTPUT_BYTES:
                    raise _TooLarge
                rows.append(converted)
            if len(rows) > max_rows:
                raise _TooManyRows
            want = max(1, min(FETCH_BATCH, (MAX_OUTPUT_BYTES - size) // max(largest, 1)))
        return {"rows": rows, "row_count": len(rows), "columns": columns}
    finally:
        result.close()


class _Watchdog:
    """Interrupts a SQLite statement at the deadline (a cancelled task cannot stop SQLite's thread),
    or once the disk of SQLite's temporary files is down to its reserve (`out_of_space`), looked at
    every CHECK_SECONDS (sqlite_temp_space)."""

    def __init__(self, driver_connection: Any, delay: float) -> None:
        self.fired = False
        self.out_of_space = False
        self._driver = driver_connection
        self._tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(delay, self._fire)
        self._space = loop.call_later(CHECK_SECONDS, self._check_space)

    def _fire(self) -> None:
        self.fired = True
        self._interrupt()

    def _check_space(self) -> None:
        if below_reserve():
            self.out_of_space = True
            self._interrupt()
        else:
            self._space = asyncio.get_running_loop().call_later(CHECK_SECONDS, self._check_space)

    def _interrupt(self) -> None:
        task = asyncio.get_running_loop().create_task(self._driver.interrupt())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        self._handle.cancel()
        self._space.cancel()


async def _sqlite_watchdog(conn: AsyncConnection, delay: float) -> _Watchdog | None:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    return _Watchdog(driver, delay) if hasattr(driver, "interrupt") else None


# Statements that reach other database files from a SQLite connection.
_SQLITE_ESCAPES = re.compile(r"\b(attach|detach|vacuum|load_extension)\b", re.IGNORECASE)


def _refuse_sqlite_statements(url: URL, query: str) -> None:
    """Refuse statements that open other files from a SQLite connection."""
    if url.get_backend_name() == "sqlite" and _SQLITE_ESCAPES.search(query):
        raise NodeError(
            "ATTACH, DETACH, VACUUM and load_extension are not allowed on SQLite", reason="SQL_STATEMENT_FORBIDDEN"
        )


def _database_error(exc: UnsupportedDatabase) -> NodeError:
    reason = "SQL_DATABASE_FORBIDDEN" if isinstance(exc, ForbiddenDatabase) else "SQL_UNSUPPORTED_DATABASE"
    return NodeError(str(exc), reason=reason)


def connection_string_problem(value: object) -> str | None:
    """Why a config's connection string is refused, or None (also when only the run can tell: it
    holds a ${name} reference). A ${secret:NAME} stands for a plain value here."""
    if not isinstance(value, str) or not re.match(CONNECTION_STRING_PATTERN, value):
        return None  # the schema reports it
    stood_in = stand_in(value, "secret")
    if "${" in stood_in:
        return None
    try:
        async_url(stood_in)
    except UnsupportedDatabase as exc:
        return str(exc)
    return None


class SQLDatabaseNode(NodeType):
    """One parameterised SQL statement against SQLite or PostgreSQL."""

    type_name: ClassVar[str] = "SQLDatabaseNode"
    description: ClassVar[str] = (
        "Runs one parameterised SQL statement (:name parameters bound by the driver) on SQLite or PostgreSQL "
        "through a shared connection pool; returns rows as objects."
    )
    category: ClassVar[str] = "data"
    config_schema: ClassVar[JsonSchema] = _CONFIG_SCHEMA
    # Bind parameters and ${name} references may name any parameter.
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": dict(_CONFIG_SCHEMA["properties"]),
        "additionalProperties": True,
    }
    open_inputs: ClassVar[bool] = True
    # Never the query itself: values reach SQL only as bound parameters.
    secret_fields: ClassVar[frozenset[str]] = frozenset({"connection_string", "query_params", "parameters"})
    outputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {
            "result": _RESULT_SCHEMA,
        },
    }
    # Kept once, in `result`: rows are what a query's outputs are mostly made of.
    output_aliases: ClassVar[Mapping[str, str]] = {"rows": "result.rows", "row_count": "result.row_count"}
    # A write is not safe to run twice.
    retry_safe: ClassVar[bool] = False
    default_timeout: ClassVar[float] = 30.0
    max_timeout: ClassVar[float] = 600.0

    @classmethod
    def validate_config(cls, config: Mapping[str, Any], path: str) -> list[Violation]:
        problems = super().validate_config(config, path)
        given = [key for key in ("connection_string", "resource_name") if key in config]
        if not given:
            problems.append((f"{path}.connection_string", f"{cls.type_name} needs connection_string or resource_name"))
        elif len(given) == 2:
            problems.append((f"{path}.resource_name", "give connection_string or resource_name, not both"))
        if (problem := connection_string_problem(config.get("connection_string"))) is not None:
            problems.append((f"{path}.connection_string", problem))
        return problems

    @classmethod
    def is_retry_safe(cls, config: Mapping[str, Any]) -> bool:
        query = config.get("query")
        # A plain SELECT reads only; anything else may write.
        return isinstance(query, str) and query.lstrip().upper().startswith("SELECT")

    @classmethod
    def reads(cls, config: Mapping[str, Any]) -> set[str] | None:
        names = super().reads(config) or set()
        query = config.get("query")
        if isinstance(query, str):
            with contextlib.suppress(NodeError):  # reported when the node runs
                # Not the execution's own variables: those binds never read an input.
                names.update(set(prepare_query(query).bind_names) - EXECUTION_VARIABLE_NAMES)
        return names

    def prepare(self, config: Mapping[str, Any]) -> PreparedSql:
        # A changed connection or query could send a bound secret elsewhere or
        # select it into the rows (SELECT :token): then none is resolved.
        secrets = ConfigSecrets.of(config, self.secret_fields, ("connection_string", "resource_name", "query"))
        pinned = {key: config.get(key, ABSENT) for key in SQL_RESOURCE_PINNED} if "resource_name" in config else {}
        own = own_binds(config)
        query = config.get("query")
        if not isinstance(query, str) or not query.strip():
            return PreparedSql(None, secrets, pinned, own)
        try:
            return PreparedSql(prepare_query(query), secrets, pinned, own)
        except NodeError:  # reported by run, where it fails the node rather than the plan
            return PreparedSql(None, secrets, pinned, own)

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        scope = prepared.secrets if isinstance(prepared, PreparedSql) else None
        async with revealed(ctx, scope, params) as secrets:
            # Rows may hold a value the query was given (SELECT :token): the outputs are recorded, so mask it.
            return secrets.redact(await self._run(ctx, prepared, params, secrets))

    async def _run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any], secrets: Revealed) -> dict[str, Any]:
        if params.get("resource_name") is not None:
            return await self._run_on_resource(ctx, prepared, params, secrets)
        connection_string = params.get("connection_string")
        inserted = secrets.for_key("connection_string")
        if isinstance(connection_string, str) and inserted is not None:
            connection_string = insert_secrets(connection_string, inserted)
        try:
            url = async_url(connection_string) if isinstance(connection_string, str) else None
        except UnsupportedDatabase as exc:
            raise _database_error(exc) from None
        check_params(type(self), params)
        if url is None or not isinstance(connection_string, str):
            raise NodeError("connection_string or resource_name is required", reason="INVALID_PARAMETER")
        _refuse_sqlite_statements(url, str(params.get("query", "")))
        pools = ctx.services.sql
        if pools is None:
            raise NodeError("no SQL pools are configured", reason="SQL_POOLS_UNAVAILABLE")
        try:
            engine = pools.engine(
                connection_string,
                int(params.get("pool_size", 5)),
                int(params.get("max_overflow", 10)),
                int(params.get("pool_recycle", 3600)),
                tenant=ctx.tenant,
            )
        except UnsupportedDatabase as exc:
            raise _database_error(exc) from None
        # Held until the statement ends: an engine dropped from the cache meanwhile is disposed after it.
        async with pools.using(engine):
            return await self._query(
                ctx, prepared, params, secrets, engine=engine, url=url, where=describe(connection_string)
            )

    async def _run_on_resource(
        self, ctx: NodeContext, prepared: Any, params: dict[str, Any], secrets: Revealed
    ) -> dict[str, Any]:
        check_params(type(self), params)
        if params.get("connection_string") is not None:
            raise NodeError("give connection_string or resource_name, not both", reason="INVALID_PARAMETER")
        pinned_to_config(params, prepared.pinned if isinstance(prepared, PreparedSql) else {}, SQL_RESOURCE_PINNED)
        directory = ctx.services.resources
        if directory is None:
            raise NodeError("this server has no resource registry", reason="RESOURCES_UNAVAILABLE")
        name = str(params["resource_name"])
        resolved = await directory.database(ctx, name)
        pools = ctx.services.sql
        if pools is None:
            raise NodeError("no SQL pools are configured", reason="SQL_POOLS_UNAVAILABLE")
        with masking(ctx, resolved.secret_values) as mask:
            try:
                url = async_url(resolved.connection_string)
                # Before the pool exists: a refused database is never opened, nor health-checked.
                _refuse_sqlite_statements(url, str(params.get("query", "")))
                engine = directory.pool(ctx.tenant, resolved)
            except UnsupportedDatabase as exc:
                raise _database_error(exc) from None
            async with pools.using(engine):
                result = await self._query(
                    ctx, prepared, params, secrets, engine=engine, url=url, where=f"resource {name!r}"
                )
        masked: dict[str, Any] = mask.value(result)
        return masked

    async def _query(
        self,
        ctx: NodeContext,
        prepared: Any,
        params: dict[str, Any],
        secrets: Revealed,
        *,
        engine: AsyncEngine,
        url: URL,
        where: str,
    ) -> dict[str, Any]:
        query = params["query"]
        compiled = prepared.query if isinstance(prepared, PreparedSql) else None
        if compiled is None or compiled.query != query:
            compiled = prepare_query(query)
        # The execution's variables as PythonCodeNode code sees them; a mapping of one counts only in the config.
        configured = prepared.own_binds if isinstance(prepared, PreparedSql) else {}
        values = bind_values(compiled, params, secrets, own=own_variables(ctx, params), configured=configured)
        max_rows = int(params.get("max_rows", DEFAULT_MAX_ROWS))
        # A little before the engine's own deadline, so the node reports what timed out.
        remaining = ctx.remaining - DEADLINE_MARGIN
        if remaining <= 0:
            raise NodeError("no time left for the query", reason="SQL_TIMEOUT", retryable=True)
        result = await _run_statement(
            engine,
            url,
            prepared=compiled,
            values=values,
            max_rows=max_rows,
            remaining=remaining,
            where=where,
        )
        return {"result": result}


async def _run_statement(
    engine: AsyncEngine,
    url: URL,
    *,
    prepared: PreparedQuery,
    values: dict[str, Any],
    max_rows: int,
    remaining: float,
    where: str,
) -> dict[str, Any]:
    """One statement in its own transaction within `remaining` seconds (a CLIENT span when tracing)."""
    # Created here, run by the await: inside the span when there is one.
    statement = _statement(
        engine, url, prepared=prepared, values=values, max_rows=max_rows, remaining=remaining, where=where
    )
    if not tracing.enabled():
        return await statement
    # The statement's text only: values are bound, never part of it.
    attributes = {"db.system": url.get_backend_name(), "db.query.text": prepared.query[:2048]}
    with tracing.span("SQL", kind="client", attributes=attributes) as span:
        result = await statement
        if span is not None:
            span.set_attribute("db.response.returned_rows", len(result["rows"]))
        return result


async def _statement(
    engine: AsyncEngine,
    url: URL,
    *,
    prepared: PreparedQuery,
    values: dict[str, Any],
    max_rows: int,
    remaining: float,
    where: str,
) -> dict[str, Any]:
    """One statement in its own transaction within `remaining` seconds; errors as NodeError."""
    postgres = url.get_backend_name() == "postgresql"
    timeout_ms = max(1, int(remaining * 1000)) if postgres else None
    connected = False
    watchdog: _Watchdog | None = None
    try:
        async with asyncio.timeout(remaining), engine.connect() as conn:
            connected = True
            watchdog = await _sqlite_watchdog(conn, remaining) if url.get_backend_name() == "sqlite" else None
            try:
                async with conn.begin():
                    return await conn.run_sync(_execute, prepared, values, max_rows, timeout_ms)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
    except Exception as exc:
        if connected or not postgres:
            failure = _failure(exc, connected, where, remaining=remaining, max_rows=max_rows, watchdog=watchdog)
            if failure is exc:
                raise
            raise failure from exc
        # One message whatever the cause: a node must not tell a refused target from a closed
        # port, a missing host or a wrong password (a port scanner); the log has the cause.
        log.warning("SQL connection to %s failed: %s: %s", _target(url), type(exc).__name__, exc)
        raise NodeError(
            f"could not connect to the database at {_target(url)}", reason="SQL_UNAVAILABLE", retryable=True
        ) from None


def _target(url: URL) -> str:
    """host:port of each host of a PostgreSQL `url`, as written (for messages)."""
    try:
        targets = postgres_targets(connect_arguments(url))
    except UnsupportedDatabase:  # refused before the pool is made: not reached
        return "its host"
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in targets)


def _failure(
    exc: Exception, connected: bool, where: str, *, remaining: float, max_rows: int, watchdog: _Watchdog | None
) -> Exception:
    """The NodeError for `exc` from a statement on SQLite, or on PostgreSQL once connected (else `exc`)."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    if isinstance(exc, ForbiddenDatabase):  # a SQLite file that became a symbolic link
        return NodeError(str(exc), reason="SQL_DATABASE_FORBIDDEN")
    if isinstance(exc, TimeoutError):
        return NodeError(f"query on {where} timed out after {remaining:.3g}s", reason="SQL_TIMEOUT", retryable=True)
    if isinstance(exc, _TooManyRows):
        return NodeError(
            f"the query returned more than max_rows={max_rows} rows (rolled back)", reason="SQL_TOO_MANY_ROWS"
        )
    if isinstance(exc, _TooLarge):
        return NodeError(
            f"the query's rows outgrow a node's outputs ({MAX_OUTPUT_BYTES} bytes; rolled back)",
            reason="OUTPUT_TOO_LARGE",
        )
    if isinstance(exc, DBAPIError):
        detail = str(exc.orig) if exc.orig is not None else type(exc).__name__
        if watchdog is not None and watchdog.out_of_space:
            return NodeError(
                f"query on {where} stopped: the server's disk for SQLite's temporary files is down to its "
                "reserve (a sort, DISTINCT or GROUP BY of many rows fills it)",
                reason="SQL_TEMP_SPACE",
            )
        if getattr(exc.orig, "sqlstate", None) == _QUERY_CANCELED or (watchdog is not None and watchdog.fired):
            return NodeError(f"query on {where} timed out", reason="SQL_TIMEOUT", retryable=True)
        if not connected or exc.connection_invalidated:
            return NodeError(f"cannot reach {where}: {detail}", reason="SQL_UNAVAILABLE", retryable=True)
        return NodeError(f"query failed on {where}: {detail}", reason="SQL_ERROR")
    if isinstance(exc, OSError | SQLAlchemyError):
        if not connected:
            return NodeError(f"cannot reach {where}: {exc}", reason="SQL_UNAVAILABLE", retryable=True)
        return NodeError(f"query failed on {where}: {exc}", reason="SQL_ERROR")
    return exc


class AsyncSQLDatabaseNode(SQLDatabaseNode):
    """The seed's async name for SQLDatabaseNode; the same behaviour."""

    type_name: ClassVar[str] = "AsyncSQLDatabaseNode"
    description: ClassVar[str] = "Same as SQLDatabaseNode (the seed's async name for it)."
