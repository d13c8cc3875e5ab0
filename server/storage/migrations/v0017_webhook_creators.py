"""Who registered each webhook, and whose sessions' events it receives.

A webhook belongs to the credential that registered it (`creator`, as for
sessions); the tenant's admins see every one. `session_scope` is NULL for a
webhook that receives the events of every session of its tenant (registered
by an admin), else the credential whose sessions' events alone it receives.
Webhooks from before recorded no registrant: '' and NULL, i.e. as if an
admin had registered them (tenant-wide, managed by the tenant's admins).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.add_column("webhooks", sa.Column("creator", sa.Text, nullable=False, server_default=""))
    op.add_column("webhooks", sa.Column("session_scope", sa.Text, nullable=True))
