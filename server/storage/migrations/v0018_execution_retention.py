"""Ended executions by age, for the retention purge (`--execution-retention-seconds`).

Partial: only ended rows (SUCCEEDED, FAILED, CANCELLED) are in it, which are
the only ones the purge removes; a running execution is never purged however
old it is.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

ENDED = sa.text("state IN (3, 4, 5)")


def upgrade(op: Operations) -> None:
    op.create_index("executions_ended_by_time", "executions", ["create_us"], sqlite_where=ENDED, postgresql_where=ENDED)
