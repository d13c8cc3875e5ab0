"""Which process runs an unfinished execution, and until when its claim holds.

A process renews the leases of the executions it runs; another process
takes over an execution whose lease expired (its owner died), so several
processes on one database never run one execution twice while its owner
lives, and none is left behind when it dies. Rows from before are free to
take (lease 0).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

UNFINISHED = sa.text("state IN (1, 2)")


def upgrade(op: Operations) -> None:
    op.add_column("executions", sa.Column("owner", sa.Text, nullable=False, server_default=""))
    op.add_column("executions", sa.Column("lease_until_us", sa.BigInteger, nullable=False, server_default="0"))
    op.create_index(
        "executions_leases",
        "executions",
        ["lease_until_us"],
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )
