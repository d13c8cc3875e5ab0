"""Shared SQLAlchemy async engines (connection pools), one per database.

SQL nodes never create an engine per call: `SqlPools.engine` returns the
process-wide `AsyncEngine` for a connection string, creating it on first
use. The first caller's pool settings win for the life of the engine.

Connection strings name the database, not the driver: `sqlite:///path.db`
and `postgresql://user:pass@host:5432/db` (also `postgres://`) are mapped
to the async drivers `sqlite+aiosqlite` and `postgresql+asyncpg`; naming
those drivers explicitly is accepted too. Anything else is refused with
`UnsupportedDatabase`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any, Final

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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
    return url


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

    def __init__(self) -> None:
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
            engine = create_async_engine(url, **options)
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
        engine = create_async_engine(url, **options)
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
