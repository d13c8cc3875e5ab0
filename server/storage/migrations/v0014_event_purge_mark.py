"""The highest event id retention has ever dropped.

Event ids are not consecutive (a restart skips the rest of its reserved
block, Redis ids come from its clock), so the oldest kept id says nothing
about whether a cursor below it missed events: this mark does. A resumed
stream is out of range only when its cursor is below it. Logs from before
kept no such mark: everything below their oldest kept event counts as
dropped, as streams were told until now.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.add_column(
        "event_id_reservation", sa.Column("purged_through", sa.BigInteger, nullable=False, server_default="0")
    )
    op.execute(
        "UPDATE event_id_reservation SET purged_through = COALESCE((SELECT MIN(id) - 1 FROM events), reserved_until)"
    )
