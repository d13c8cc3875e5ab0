"""Which process attempts an unfinished webhook delivery, and until when.

As for executions (v0010): a process renews the leases of the deliveries it
holds, and another takes over deliveries whose lease ran out, so a process
that starts while others retry their deliveries does not send them again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

DUE = sa.text("state IN (1, 2)")


def upgrade(op: Operations) -> None:
    op.add_column("webhook_deliveries", sa.Column("owner", sa.Text, nullable=False, server_default=""))
    op.add_column("webhook_deliveries", sa.Column("lease_until_us", sa.BigInteger, nullable=False, server_default="0"))
    op.create_index(
        "webhook_deliveries_leases",
        "webhook_deliveries",
        ["lease_until_us"],
        sqlite_where=DUE,
        postgresql_where=DUE,
    )
