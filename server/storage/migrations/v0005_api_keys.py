"""API keys: only a hash of each key is kept."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("key_hash", sa.LargeBinary, nullable=False, unique=True),  # SHA-256 of the whole key
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("expire_us", sa.BigInteger),  # NULL: never expires
        sa.Column("revoke_us", sa.BigInteger),  # NULL: not revoked
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.ApiKey, serialized
    )
    op.create_index("api_keys_by_tenant", "api_keys", ["tenant", sa.text("create_us DESC")])
