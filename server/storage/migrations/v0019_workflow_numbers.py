"""The last version number of each workflow whose versions the purge removed.

Versions deleted an hour ago are removed (`purge_deleted_workflows`), so
that deleted workflows stop counting against the tenant's cap. A workflow
created again under the same id then continues its numbering from here,
instead of starting at 1 again: a version number never names two
different definitions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "workflow_numbers",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("workflow_id", sa.Text, primary_key=True),
        sa.Column("last_version", sa.BigInteger, nullable=False),
    )
