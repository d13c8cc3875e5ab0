"""Sessions created, counted per tenant without a write on the create path.

A session row stays until the purge removes it (a deleted session is only
marked expired), and the purge adds what it removes to its tenant's
`removed`: the sessions a tenant ever created are its rows plus `removed`.
Creates touch no shared row, so concurrent processes never wait on a counter.
Sessions purged before this migration were not counted.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "session_counts",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("removed", sa.BigInteger, nullable=False),
    )
