"""Shared resources: a tenant's named database pools and HTTP client profiles."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "resources",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("update_us", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.Resource, serialized
        sa.PrimaryKeyConstraint("tenant", "name"),
    )
