"""Versioned schema migrations, one source for SQLite and PostgreSQL.

Each `migrations/vNNNN_name.py` module has an `upgrade(op)` written with
Alembic's operations, which render the right DDL for either engine. They
are applied in order, each in its own transaction (DDL is transactional on
both), and recorded in `schema_migrations`. A database migrated by a newer
flowport (a version this code does not know) is refused rather than guessed
at. On PostgreSQL an advisory lock makes processes starting together
migrate one after the other.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowport.server.clock import now_us
from flowport.server.storage import migrations as migrations_package

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.operations import Operations

log = logging.getLogger(__name__)
# Alembic reports each step at INFO; flowport logs the migrations it applies itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

_NAME = re.compile(r"^v(\d{4})_([a-z0-9_]+)$")
# Any constant works; this one spells "flowport" in ASCII.
_ADVISORY_LOCK = 0x666C6F77706F7274


class MigrationError(RuntimeError):
    """The database's schema cannot be brought to this code's version."""


@dataclass(frozen=True)
class Migration:
    """One numbered schema change."""

    version: int
    name: str
    upgrade: Callable[[Operations], None]


def bundled() -> list[Migration]:
    """The migrations shipped with this package, in version order. Each module (and with it
    SQLAlchemy and Alembic) loads only when its migration runs: an up-to-date start needs neither."""
    found = []
    for module in pkgutil.iter_modules(migrations_package.__path__):
        match = _NAME.match(module.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), _loaded(f"{migrations_package.__name__}.{module.name}"))
            )
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} breaks the sequence at {expected}"
            )
    return found


def _loaded(module: str) -> Callable[[Operations], None]:
    def upgrade(op: Operations) -> None:
        importlib.import_module(module).upgrade(op)

    return upgrade


def engine_for(url: str) -> sa.Engine:
    """A SQLAlchemy engine for migrating the database at `url` (sqlite:/// or postgresql+psycopg://)."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        # pysqlite begins transactions only before DML; DDL would commit as
        # it goes. Take transactions in hand, so a migration is all or nothing.
        @sa.event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN")

    return engine


def migrate(url: str, migrations: list[Migration], where: str = "database", *, snapshot: bool = True) -> list[int]:
    """Apply what is missing to the database at `url`; the versions applied now. A new, empty
    SQLite file is made from the schema snapshot (server/storage/sqlite_snapshot.py) unless
    `snapshot` is off."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if _sqlite_is_current(path, migrations):
            return []
        # A file name a URL cannot carry as it is (`?`) or an in-memory database takes the migrations.
        if snapshot and path != ":memory:" and "?" not in path:
            from flowport.server.storage.sqlite_snapshot import create_from_snapshot

            created = create_from_snapshot(Path(path), migrations)
            if created is not None:
                log.info(
                    "%s: applied schema migrations %s (from the schema snapshot)",
                    where,
                    ", ".join(f"{v:04d}" for v in created),
                )
                return created
    import sqlalchemy as sa

    engine = engine_for(url)
    try:
        try:
            connection = engine.connect()
        except sa.exc.OperationalError as exc:
            # The database is not there (down, a wrong host or port, a bad password): one line that
            # names it, not the driver's traceback. The driver's first line says which it is.
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
            raise MigrationError(f"cannot connect to {where} (--database-url): {reason}") from None
        with connection as conn:
            postgres = engine.dialect.name == "postgresql"
            if postgres:
                conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _ADVISORY_LOCK})
                conn.commit()
            try:
                applied = _apply(conn, migrations, where)
            finally:
                if postgres:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_LOCK})
                    conn.commit()
    finally:
        engine.dispose()
    if applied:
        log.info("%s: applied schema migrations %s", where, ", ".join(f"{v:04d}" for v in applied))
    return applied


def _sqlite_is_current(path: str, migrations: list[Migration]) -> bool:
    """Whether the SQLite file has exactly `migrations` applied, read with the standard library:
    then nothing needs SQLAlchemy. Anything else (no table yet, missing or unknown versions)
    takes the full path, which applies or refuses."""
    try:
        uri = Path(path).resolve().as_uri() + "?mode=ro"  # read only: never creates the file
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    except sqlite3.Error:
        return False
    return done == {m.version for m in migrations}


def _apply(conn: sa.Connection, migrations: list[Migration], where: str) -> list[int]:
    import sqlalchemy as sa
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    with conn.begin():
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_us BIGINT NOT NULL)"
            )
        )
        done = [row[0] for row in conn.execute(sa.text("SELECT version FROM schema_migrations ORDER BY version"))]
    known = {m.version for m in migrations}
    unknown = [v for v in done if v not in known]
    if unknown:
        raise MigrationError(
            f"{where} has schema version {max(unknown)}, newer than this flowport knows "
            f"({max(known, default=0)}): upgrade flowport or use another database"
        )
    applied = []
    for migration in migrations:
        if migration.version in done:
            continue
        try:
            with conn.begin():
                migration.upgrade(Operations(MigrationContext.configure(conn)))
                conn.execute(
                    sa.text("INSERT INTO schema_migrations VALUES (:version, :name, :applied_us)"),
                    {"version": migration.version, "name": migration.name, "applied_us": now_us()},
                )
        except sa.exc.SQLAlchemyError as exc:
            detail = str(exc.orig) if isinstance(exc, sa.exc.DBAPIError) else str(exc)
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} failed on {where}: {detail}"
            ) from exc
        applied.append(migration.version)
    return applied
