"""Secrets: values only as AES-256-GCM ciphertext, bound to (tenant, name)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "secrets",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),  # 1 at creation, +1 on every change
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("update_us", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),  # the keyring key that sealed the value
        sa.Column("sealed", sa.LargeBinary, nullable=False),  # nonce || ciphertext || tag
        sa.PrimaryKeyConstraint("tenant", "name"),
    )
    # Key rotation finds the rows still sealed with an old key.
    op.create_index("secrets_by_key", "secrets", ["key_id"])
