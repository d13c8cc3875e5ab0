"""What a default start imports: the clients of optional backends (Redis, PostgreSQL,
OpenTelemetry, PyJWT) load only when a setting asks for them, and SQLAlchemy and
Alembic only for migrations a new SQLite file's schema snapshot does not cover.
Each of these costs tens to hundreds of milliseconds of a start; this keeps them
from creeping back."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flowport.server.storage.migrate import bundled
from flowport.server.supervisor import child_environment

from ..conftest import make_settings

pytestmark = pytest.mark.timeout(120)

# A start as `flowport serve` makes it: the CLI imported, the server started and stopped.
START = """
import asyncio, json, sys
from flowport.clients.cli import main
from flowport.server.app import start, stop
from flowport.server.settings import Settings

async def run():
    running = await start(Settings.load({}, config_file=None))
    await stop(running, 0.5)

asyncio.run(run())
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

OPTIONAL = {"redis", "opentelemetry", "jwt", "asyncpg", "psycopg", "psycopg_pool"}
MIGRATIONS_ONLY = {"sqlalchemy", "alembic"}


def _started(data: Path) -> set[str]:
    env = child_environment(make_settings(data))
    done = subprocess.run(
        [sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_default_start_loads_no_optional_backend(tmp_path: Path) -> None:
    for start in ("fresh", "again"):
        loaded = _started(tmp_path / "data")
        assert not loaded & (OPTIONAL | MIGRATIONS_ONLY), (start, sorted(loaded & (OPTIONAL | MIGRATIONS_ONLY)))
    # The first start made the whole schema (from the snapshot), so nothing was skipped.
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "flowport.db")) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m.version for m in bundled()]
