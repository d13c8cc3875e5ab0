"""The event log: every event, by increasing id, kept for a retention window."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "events",
        # Assigned by the server, increasing. INTEGER on SQLite: the rowid itself.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("time_us", sa.BigInteger, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("workflow_id", sa.Text, nullable=False),
        sa.Column("execution_id", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),  # the event's data object, JSON
    )
    op.create_index("events_by_tenant", "events", ["tenant", "id"])
    op.create_index("events_by_time", "events", ["time_us"])
