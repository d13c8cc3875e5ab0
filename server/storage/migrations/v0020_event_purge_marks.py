"""The highest event id retention has dropped, per tenant.

Retention now goes per tenant (the newest `--event-retention-count` events
of each), so one tenant's volume never pushes another's events out, nor its
streams' cursors out of range. The global mark of `event_id_reservation`
stays as the floor of every tenant's: what was dropped before this
migration was dropped for all.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "event_purge_marks",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("purged_through", sa.BigInteger, nullable=False),
    )
