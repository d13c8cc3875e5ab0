"""Versioned schema migrations: numbered SQL files applied in order, once.

`migrations/NNNN_name.sql` files are applied in their own transaction each
and recorded in `schema_migrations`. A database migrated by a newer flowport
(a version this code does not know) is refused rather than guessed at.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database's schema cannot be brought to this code's version."""


@dataclass(frozen=True)
class Migration:
    """One numbered schema change."""

    version: int
    name: str
    sql: str


def bundled() -> list[Migration]:
    """The migrations shipped with this package, in version order."""
    folder = resources.files("flowport.server.storage") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} breaks the sequence at {expected}"
            )
    return found


def applied_versions(conn: sqlite3.Connection) -> list[int]:
    """Versions recorded in the database, ascending."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_us INTEGER NOT NULL)"
    )
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def migrate(conn: sqlite3.Connection, migrations: list[Migration], path: Path | str = "database") -> list[int]:
    """Apply what is missing; return the versions applied now."""
    done = applied_versions(conn)
    known = {m.version for m in migrations}
    unknown = [v for v in done if v not in known]
    if unknown:
        raise MigrationError(
            f"{path} has schema version {max(unknown)}, newer than this flowport knows "
            f"({max(known, default=0)}): upgrade flowport or use another --data-dir"
        )
    applied = []
    for migration in migrations:
        if migration.version in done:
            continue
        try:
            # executescript commits first; BEGIN/COMMIT make the file atomic.
            conn.executescript(
                f"BEGIN;\n{migration.sql}\n"
                "INSERT INTO schema_migrations VALUES "
                f"({migration.version}, '{migration.name}', {time.time_ns() // 1000});\n"
                "COMMIT;"
            )
        except sqlite3.Error as exc:
            conn.rollback()
            raise MigrationError(f"migration {migration.version:04d}_{migration.name} failed on {path}: {exc}") from exc
        applied.append(migration.version)
    return applied
