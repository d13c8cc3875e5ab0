"""Event ids are reserved in blocks before they are handed out, so a crash
(events seen live but not yet written) or a purge that empties the log
never makes the server hand out an id again."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    table = op.create_table(
        "event_id_reservation",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("reserved_until", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="one_row"),
    )
    op.bulk_insert(table, [{"id": 1, "reserved_until": 0}])
