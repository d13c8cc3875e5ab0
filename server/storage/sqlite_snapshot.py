"""A new SQLite database made in one step from a snapshot of the migrated schema.

Applying every migration through Alembic costs a first start about half a
second (SQLAlchemy and Alembic imported, then each DDL step). A brand-new,
empty SQLite file gets the same result from `sqlite_schema.sql`: the dump
(`sqlite3` `iterdump`) of a database migrated step by step, schema and the
rows migrations insert, without `schema_migrations`, whose rows are written
here with this start's time. The migrations stay the one source: the
snapshot is generated from them (`python -m flowport.server.storage.sqlite_snapshot`)
and a test fails when it is stale; a database that is not empty, or a
snapshot that does not list exactly the bundled versions, takes the
migrations as before.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import tempfile
from importlib import resources
from pathlib import Path

from flowport.server.clock import now_us
from flowport.server.storage.migrate import Migration, MigrationError, bundled, migrate

SNAPSHOT = "sqlite_schema.sql"
_VERSIONS = "-- versions: "


def render() -> str:
    """The snapshot text of a database migrated step by step with the bundled migrations."""
    migrations = bundled()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "snapshot.db"
        migrate(f"sqlite:///{path}", migrations, "the schema snapshot", snapshot=False)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            statements = [
                line
                for line in conn.iterdump()
                if not line.startswith('INSERT INTO "schema_migrations"')
                and line not in ("BEGIN TRANSACTION;", "COMMIT;")
            ]
    listed = ",".join(f"{m.version}:{m.name}" for m in migrations)
    header = [
        "-- The SQLite schema after every migration: generated, do not edit.",
        "-- python -m flowport.server.storage.sqlite_snapshot rewrites it.",
        _VERSIONS + listed,
    ]
    return "\n".join([*header, *statements]) + "\n"


def snapshot_text() -> str:
    """The snapshot shipped with this package."""
    return resources.files("flowport.server.storage").joinpath(SNAPSHOT).read_text(encoding="utf-8")


def create_from_snapshot(path: Path, migrations: list[Migration]) -> list[int] | None:
    """Make the empty database at `path` from the snapshot; the versions it stands for, or None
    (nothing done) when the database is not empty or the snapshot is not of `migrations`."""
    try:
        text = snapshot_text()
    except OSError:
        return None
    first = next((line for line in text.splitlines() if line.startswith(_VERSIONS)), "")
    listed = first.removeprefix(_VERSIONS)
    if listed != ",".join(f"{m.version}:{m.name}" for m in migrations):
        return None
    try:
        return _create(path, migrations, text)
    except sqlite3.Error as exc:
        raise MigrationError(f"cannot create the schema of {path}: {exc}") from exc


def _create(path: Path, migrations: list[Migration], text: str) -> list[int] | None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                conn.execute("ROLLBACK")
                return None
            for statement in _statements(text):
                conn.execute(statement)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_us BIGINT NOT NULL)"
            )
            applied = now_us()
            conn.executemany(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)", [(m.version, m.name, applied) for m in migrations]
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (a full disk)
                conn.execute("ROLLBACK")
            raise
    return [m.version for m in migrations]


def _statements(text: str) -> list[str]:
    """The snapshot's SQL statements, one by one (a statement may span lines)."""
    found: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if not current and (not line or line.startswith("--")):
            continue
        current.append(line)
        candidate = "\n".join(current)
        if sqlite3.complete_statement(candidate):
            found.append(candidate)
            current = []
    if current:
        raise ValueError("the schema snapshot ends inside a statement")
    return found


def main() -> int:
    target = Path(__file__).with_name(SNAPSHOT)
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
