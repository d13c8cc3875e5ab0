"""What lets processes sharing a PostgreSQL database keep workflows in memory.

`workflow_changes.seq` goes up with every workflow create or delete, in the
same transaction: on PostgreSQL a statement trigger on `workflows` raises it
(inserts, and updates of `deleted_us`), so writes of processes still on an
earlier release raise it too while a deployment is rolled (they do not wait
for the acknowledgements; their changes reach the other processes within a
poll, or a lease for a process that stopped polling). SQLite keeps no such
cache and gets no trigger. Each process that keeps workflows holds a row in
`workflow_cache_acks`: the last `seq` it has seen (having dropped what it
kept before it) and until when, by the database's clock, it may keep using
what it holds. A create or delete answers once every row whose time has not
run out has seen its `seq` (server/storage/workflow_cache.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    changes = op.create_table(
        "workflow_changes",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="one_change_counter"),
    )
    op.bulk_insert(changes, [{"id": 1, "seq": 0}])
    op.create_table(
        "workflow_cache_acks",
        sa.Column("owner", sa.Text, primary_key=True),
        sa.Column("seen", sa.BigInteger, nullable=False),
        sa.Column("until_us", sa.BigInteger, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION flowport_workflows_changed() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN UPDATE workflow_changes SET seq = seq + 1 WHERE id = 1; RETURN NULL; END $$"
        )
        op.execute(
            "CREATE TRIGGER workflows_changed AFTER INSERT OR UPDATE OF deleted_us ON workflows"
            " FOR EACH STATEMENT EXECUTE FUNCTION flowport_workflows_changed()"
        )
