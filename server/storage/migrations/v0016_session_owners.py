"""Whose session each execution and workflow version belongs to.

What runs or is created in a session is its creator's (and the tenant's
admins'), also after the session has expired and been removed: the session's
creator is copied onto the execution or workflow row when it is written, so
lists filter on it in SQL. Rows from before take it from their session if it
is still there; those whose session is gone are nobody's (admins see them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

IN_SESSION = sa.text("session_id <> ''")


def upgrade(op: Operations) -> None:
    for table in ("executions", "workflows"):
        op.add_column(table, sa.Column("session_creator", sa.Text, nullable=False, server_default=""))
        op.execute(
            f"UPDATE {table} SET session_creator = COALESCE((SELECT s.creator FROM sessions s"  # noqa: S608 - fixed names
            f" WHERE s.session_id = {table}.session_id AND s.tenant = {table}.tenant), '') WHERE session_id <> ''"
        )
        # Who owns a session once its row is gone (SessionTables.session_owner).
        op.create_index(
            f"{table}_by_session",
            table,
            ["tenant", "session_id"],
            sqlite_where=IN_SESSION,
            postgresql_where=IN_SESSION,
        )
