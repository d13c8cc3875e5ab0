"""Sessions, and idempotency records for every mutating call."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "sessions",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("expire_us", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.Session, serialized
    )
    op.create_index(
        "sessions_by_tenant_time", "sessions", ["tenant", sa.text("create_us DESC"), sa.text("session_id DESC")]
    )
    op.create_index("sessions_by_expiry", "sessions", ["expire_us"])
    op.create_table(
        "idempotency",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("request_hash", sa.LargeBinary, nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "method", "request_id"),
    )
    op.create_index("idempotency_by_time", "idempotency", ["create_us"])
