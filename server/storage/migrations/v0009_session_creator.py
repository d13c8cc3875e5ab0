"""Who created each session, so that callers without the admin role list
only their own. Sessions from before are nobody's: admins still see them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.add_column("sessions", sa.Column("creator", sa.Text, nullable=False, server_default=""))
    op.create_index(
        "sessions_by_creator_time",
        "sessions",
        ["tenant", "creator", sa.text("create_us DESC"), sa.text("session_id DESC")],
    )
