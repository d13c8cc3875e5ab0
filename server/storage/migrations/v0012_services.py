"""The service registry: a tenant's external services, their TTL and provider for filtering."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "services",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("service_id", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("expire_us", sa.BigInteger, nullable=False),  # 0: no TTL
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.RegisteredService, serialized
        sa.PrimaryKeyConstraint("tenant", "service_id"),
    )
