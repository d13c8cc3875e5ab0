"""Which tenant each workflow change was, so that processes drop only that tenant's kept rows.

Migration 21 raises `workflow_changes.seq` once per statement that creates
or hides workflows, and every process that keeps workflows drops all it
holds when the counter moves: one tenant changing its workflows in a loop
made every process re-read every other tenant's workflows too. Now a row
trigger raises the counter for each row and records it in
`workflow_tenant_changes` under the row's tenant (one row per tenant, with
its newest change), in the same transaction; a process that saw `seq` S
and reads the counter at S' drops the tenants whose row is above S
(server/storage/workflow_cache.py). On PostgreSQL only, as before: SQLite
keeps no such cache, and gets the table alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

_PG_CHANGED = """
CREATE FUNCTION flowport_workflow_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    UPDATE workflow_changes SET seq = seq + 1 WHERE id = 1 RETURNING seq INTO changed;
    INSERT INTO workflow_tenant_changes (tenant, seq) VALUES (NEW.tenant, changed)
    ON CONFLICT (tenant) DO UPDATE SET seq = excluded.seq;
    RETURN NULL;
END $$
"""


def upgrade(op: Operations) -> None:
    op.create_table(
        "workflow_tenant_changes",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.create_index("workflow_tenant_changes_by_seq", "workflow_tenant_changes", ["seq"])
    if op.get_bind().dialect.name == "postgresql":
        # Processes of the earlier release keep writing while a deployment is rolled: held off
        # until the new trigger is in place, so that no change goes uncounted.
        op.execute("LOCK TABLE workflows IN SHARE ROW EXCLUSIVE MODE")
        op.execute("DROP TRIGGER workflows_changed ON workflows")
        op.execute("DROP FUNCTION flowport_workflows_changed()")
        op.execute(_PG_CHANGED)
        # Every row counts, each under its tenant: a delete hides each version of a workflow.
        op.execute(
            "CREATE TRIGGER workflow_tenant_changed AFTER INSERT OR UPDATE OF deleted_us ON workflows"
            " FOR EACH ROW EXECUTE FUNCTION flowport_workflow_tenant_changed()"
        )
