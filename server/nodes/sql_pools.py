"""Shared SQLAlchemy async engines (connection pools), one per database.

SQL nodes never create an engine per call: `SqlPools.engine` returns the
process-wide `AsyncEngine` for a connection string, creating it on first
use. The first caller's pool settings win for the life of the engine.

Connection strings name the database, not the driver: `sqlite:///path.db`
and `postgresql://user:pass@host:5432/db` (also `postgres://`) are mapped
to the async drivers `sqlite+aiosqlite` and `postgresql+asyncpg`; naming
those drivers explicitly is accepted too. Anything else is refused with
`UnsupportedDatabase`.

A PostgreSQL connection string must name its host(s) (no Unix sockets, no
fallback to the environment's PGHOST) and may carry only the query
parameters in `POSTGRES_QUERY_PARAMETERS` (none that reads a file on this
machine or names a target elsewhere: dsn, service, passfile, …). Every new
connection of a PostgreSQL engine then goes through the SSRF guard HTTP
nodes use (server/egress.py): each host is resolved, a private, loopback or
link-local address is refused unless `--sql-allowlist` names the host or
the address, and the connection is made to the address that was checked,
so a second DNS answer cannot swap in an internal one. With
`ssl=verify-full` the name is kept (the certificate is checked against it,
which a swapped-in server cannot pass); an allowlisted name is connected to
by name. The refusal is raised from the connection attempt, so a node, a
resource's pool and the pool health sweep all meet it. A connection string
without a password gets none: never the server's own (PGPASSWORD, ~/.pgpass).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from flowport.server.egress import normalize_allowlist, resolve_host
from flowport.server.errors import shown

# Schemes a connection string may start with, and the async driver each maps to.
ASYNC_DRIVERS: Final = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
# The same list as a JSON Schema `pattern` for node configs.
CONNECTION_STRING_PATTERN: Final = r"^(sqlite(\+aiosqlite)?|postgres(ql)?(\+asyncpg)?)://"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query parameters a PostgreSQL connection string may carry: asyncpg's connection
# options (and SQLAlchemy's) that neither read files here nor pick the target.
POSTGRES_QUERY_PARAMETERS: Final = frozenset(
    {
        "ssl",
        "direct_tls",
        "timeout",
        "command_timeout",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "prepared_statement_cache_size",
        "target_session_attrs",
        # Several hosts (?host=a:5432&host=b:5432): each is checked like the URL's own.
        "host",
        "port",
    }
)
DEFAULT_POSTGRES_PORT: Final = 5432


class UnsupportedDatabase(ValueError):
    """A connection string for a database or driver flowport does not support."""


def async_url(connection_string: str) -> URL:
    """The async-driver URL for `connection_string`; raises UnsupportedDatabase."""
    match = _SCHEME.match(connection_string)
    scheme = match.group(1).lower() if match else ""
    driver = ASYNC_DRIVERS.get(scheme)
    if driver is None:
        shown = scheme or connection_string.split(":", 1)[0][:40]
        raise UnsupportedDatabase(
            f"unsupported database {shown!r}: use sqlite:///path.db or postgresql://user:pass@host:port/db"
        )
    try:
        url = make_url(driver + connection_string[match.end(1) :] if match else connection_string)
    except ArgumentError as exc:
        raise UnsupportedDatabase(f"cannot parse the connection string for {scheme}: {exc}") from exc
    if url.get_backend_name() == "postgresql":
        postgres_targets(connect_arguments(url))
    return url


def connect_arguments(url: URL) -> dict[str, Any]:
    """The keyword arguments the driver is called with for `url` (the query's parameters included);
    raises UnsupportedDatabase for a parameter that is not accepted."""
    unknown = sorted(set(url.query) - POSTGRES_QUERY_PARAMETERS)
    if unknown:
        raise UnsupportedDatabase(
            f"connection string parameter {shown(unknown[0], 40)} is not accepted; "
            f"accepted: {', '.join(sorted(POSTGRES_QUERY_PARAMETERS))}"
        )
    try:
        _, arguments = url.get_dialect()().create_connect_args(url)
    except (ArgumentError, ValueError) as exc:
        raise UnsupportedDatabase(f"cannot use the connection string: {exc}") from exc
    return dict(arguments)


def postgres_targets(arguments: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The (host, port) pairs a PostgreSQL connection with these driver arguments goes to;
    UnsupportedDatabase when the driver would find one elsewhere (a Unix socket, the environment)."""
    given = arguments.get("host")
    listed = list(given) if isinstance(given, list | tuple) else [given]
    hosts = [host for host in listed if isinstance(host, str) and host]
    if not hosts or len(hosts) != len(listed):
        raise UnsupportedDatabase("a postgresql connection string needs a host: postgresql://user@host:5432/db")
    if any(host.startswith("/") for host in hosts):
        raise UnsupportedDatabase("Unix sockets are not accepted: give a host name or address")
    given_ports = arguments.get("port", DEFAULT_POSTGRES_PORT)
    ports = list(given_ports) if isinstance(given_ports, list | tuple) else [given_ports] * len(hosts)
    try:
        numbers = [int(port) for port in ports]
    except (TypeError, ValueError):
        raise UnsupportedDatabase("a port in the connection string is not a number") from None
    if len(numbers) != len(hosts) or not all(0 < port < 65536 for port in numbers):
        raise UnsupportedDatabase("give one port from 1 to 65535 for each host")
    return list(zip(hosts, numbers, strict=True))


async def pin_connection(arguments: dict[str, Any], allowlist: frozenset[str]) -> None:
    """Check each target host of a PostgreSQL connection against the SSRF guard and point
    `arguments` at the checked addresses; raises TargetRefused, TargetUnresolvable or
    UnsupportedDatabase (see the module docstring)."""
    targets = postgres_targets(arguments)
    # With verify-full the certificate must match the name: keep it, the check covers a changed answer.
    keep_names = str(arguments.get("ssl", os.environ.get("PGSSLMODE", ""))).lower() == "verify-full"
    hosts = []
    for host, port in targets:
        address = await resolve_host(host, port, allowlist)
        hosts.append(host if address is None or keep_names else address)
    ports = [port for _, port in targets]
    # Explicit ports, so that PGPORT in the server's environment does not pick another one.
    arguments["host"], arguments["port"] = (hosts[0], ports[0]) if len(hosts) == 1 else (hosts, ports)
    if arguments.get("password") is None:
        # Not None, or the driver would take the server's own (PGPASSWORD, ~/.pgpass) for a tenant's connection.
        arguments["password"] = ""


def _guard(engine: AsyncEngine, allowlist: frozenset[str]) -> AsyncEngine:
    """Send every new connection of a PostgreSQL `engine` through `pin_connection`."""
    if engine.url.get_backend_name() != "postgresql":
        return engine

    def pin(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # Runs inside SQLAlchemy's greenlet (the driver's connect is awaited the same way).
        await_only(pin_connection(cparams, allowlist))

    event.listen(engine.sync_engine, "do_connect", pin)
    return engine


def describe(connection_string: str) -> str:
    """The connection string with its password hidden (for messages and logs)."""
    try:
        return async_url(connection_string).render_as_string(hide_password=True)
    except UnsupportedDatabase:
        return connection_string.split("://", 1)[0] + "://…"


class SqlPools:
    """Process-wide async engines keyed by tenant and (normalised) connection string.

    Per tenant: pooled connections keep session state (temporary tables,
    settings), and an in-memory SQLite database is one connection, so a
    shared engine would let one tenant's workflows read what another's
    left behind.
    """

    def __init__(self, allowlist: frozenset[str] = frozenset()) -> None:
        # Hosts/addresses PostgreSQL connections may reach though internal (--sql-allowlist).
        self.allowlist = normalize_allowlist(allowlist)
        self._engines: dict[tuple[str, str], AsyncEngine] = {}
        # Pools of named resources (server/resources/): (tenant, name) -> (settings fingerprint, engine).
        self._resources: dict[tuple[str, str], tuple[str, AsyncEngine]] = {}
        self._disposing: set[asyncio.Task[None]] = set()
        # Statements running on each resource pool, and pools replaced while in use.
        self._users: dict[AsyncEngine, int] = {}
        self._retired: set[AsyncEngine] = set()

    def engine(
        self,
        connection_string: str,
        pool_size: int = 5,
        max_overflow: int = 10,
        pool_recycle: int = 3600,
        *,
        tenant: str = "",
        echo: bool = False,
    ) -> AsyncEngine:
        """The engine of `tenant` for `connection_string`, created on first use (with `pool_pre_ping`)."""
        url = async_url(connection_string)
        key = (tenant, url.render_as_string(hide_password=False))
        engine = self._engines.get(key)
        if engine is None:
            options: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": pool_recycle, "echo": echo}
            if not _sqlite_memory(url):  # in-memory SQLite uses one static connection, no pool sizes
                options.update(pool_size=pool_size, max_overflow=max_overflow)
            engine = _guard(create_async_engine(url, **options), self.allowlist)
            self._engines[key] = engine
        return engine

    def resource_engine(
        self,
        tenant: str,
        name: str,
        fingerprint: str,
        connection_string: str,
        *,
        pool_size: int,
        max_overflow: int,
        pool_recycle: int,
    ) -> AsyncEngine:
        """The pool of `tenant`'s resource `name`, shared by all its executions; use it inside `using`.

        A different `fingerprint` (the resource or a secret in it changed)
        replaces the pool: the old one is retired, and disposed once the
        last statement running on it has finished.
        """
        key = (tenant, name)
        held = self._resources.get(key)
        if held is not None and held[0] == fingerprint:
            return held[1]
        url = async_url(connection_string)
        options: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": pool_recycle}
        if not _sqlite_memory(url):
            # pool_timeout: a waiter gives up after the SQL node's own deadline, not SQLAlchemy's 30 s.
            options.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=3600)
        engine = _guard(create_async_engine(url, **options), self.allowlist)
        self._resources[key] = (fingerprint, engine)
        if held is not None:
            self._retire(held[1])
        return engine

    @contextlib.asynccontextmanager
    async def using(self, engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
        """Hold `engine` while a statement runs on it: a retired pool is disposed only after its
        last user, so its connections are closed, not left to the garbage collector."""
        self._users[engine] = self._users.get(engine, 0) + 1
        try:
            yield engine
        finally:
            self._users[engine] -= 1
            if not self._users[engine]:
                del self._users[engine]
                if engine in self._retired:
                    self._retired.discard(engine)
                    self._dispose_later(engine)

    def is_current(self, engine: AsyncEngine) -> bool:
        """Whether `engine` is still some resource's pool (not retired)."""
        return any(held is engine for _, held in self._resources.values())

    def discard_resource(self, tenant: str, name: str) -> bool:
        """Retire the pool of a deleted or changed resource; False when this process had none."""
        held = self._resources.pop((tenant, name), None)
        if held is not None:
            self._retire(held[1])
        return held is not None

    def resource_pools(self) -> list[tuple[str, str, str, AsyncEngine]]:
        """(tenant, name, fingerprint, engine) of every open resource pool."""
        return [(tenant, name, fp, engine) for (tenant, name), (fp, engine) in self._resources.items()]

    def _retire(self, engine: AsyncEngine) -> None:
        if self._users.get(engine):
            self._retired.add(engine)
        else:
            self._dispose_later(engine)

    def _dispose_later(self, engine: AsyncEngine) -> None:
        task = asyncio.get_running_loop().create_task(engine.dispose())
        self._disposing.add(task)
        task.add_done_callback(self._disposing.discard)

    def __len__(self) -> int:
        return len(self._engines) + len(self._resources)

    async def close(self) -> None:
        """Dispose every engine (closing pooled connections); later calls create new ones."""
        engines = [*self._engines.values(), *(engine for _, engine in self._resources.values()), *self._retired]
        self._engines, self._resources, self._retired = {}, {}, set()
        for engine in engines:
            await engine.dispose()
        await asyncio.gather(*self._disposing, return_exceptions=True)


def _sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
