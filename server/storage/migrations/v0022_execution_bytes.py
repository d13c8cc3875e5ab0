"""Bytes of stored executions, per tenant, for `--tenant-max-execution-bytes`.

`execution_bytes` holds each tenant's total of `length(body)` over its
executions, kept by triggers on `executions` in the transaction of each
insert, body update and delete, so no path that writes an execution can
leave it out. A tenant's total is the sum of its rows: on PostgreSQL each
connection adds to the row of its shard, its backend pid (unique among the
live connections), so processes writing the same tenant's executions at
once never wait on, nor deadlock over, one row; the purge folds the rows of
connections gone into shard 0. SQLite has one writer and one shard.
Executions stored before this migration are counted once, here, in shard 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

_SQLITE_UPSERT = (
    "INSERT INTO execution_bytes (tenant, shard, bytes) VALUES ({tenant}, 0, {delta})"
    " ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes"
)
# Row triggers for single-row inserts and updates; the purge deletes a batch per statement, which
# one statement trigger sums per tenant.
_PG_ROW = """
CREATE FUNCTION flowport_execution_bytes_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        delta := octet_length(NEW.body);
    ELSE
        delta := octet_length(NEW.body) - octet_length(OLD.body);
    END IF;
    IF delta <> 0 THEN
        INSERT INTO execution_bytes (tenant, shard, bytes) VALUES (NEW.tenant, pg_backend_pid(), delta)
        ON CONFLICT (tenant, shard) DO UPDATE SET bytes = execution_bytes.bytes + excluded.bytes;
    END IF;
    RETURN NULL;
END $$
"""
_PG_DELETED = """
CREATE FUNCTION flowport_execution_bytes_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_bytes (tenant, shard, bytes)
    SELECT tenant, pg_backend_pid(), -sum(octet_length(body)) FROM gone GROUP BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET bytes = execution_bytes.bytes + excluded.bytes;
    RETURN NULL;
END $$
"""


def upgrade(op: Operations) -> None:
    op.create_table(
        "execution_bytes",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("shard", sa.Integer, primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # Processes of the earlier release keep writing while a deployment is rolled: held off from
        # here to the triggers' creation, so that no execution is counted twice or not at all.
        op.execute("LOCK TABLE executions IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "INSERT INTO execution_bytes (tenant, shard, bytes)"
        " SELECT tenant, 0, sum(length(body)) FROM executions GROUP BY tenant"
    )
    if postgresql:
        op.execute(_PG_ROW)
        op.execute(_PG_DELETED)
        op.execute(
            "CREATE TRIGGER executions_bytes_written AFTER INSERT OR UPDATE OF body ON executions"
            " FOR EACH ROW EXECUTE FUNCTION flowport_execution_bytes_row()"
        )
        op.execute(
            "CREATE TRIGGER executions_bytes_deleted AFTER DELETE ON executions"
            " REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION flowport_execution_bytes_deleted()"
        )
        return
    inserted = _SQLITE_UPSERT.format(tenant="NEW.tenant", delta="length(NEW.body)")
    updated = _SQLITE_UPSERT.format(tenant="NEW.tenant", delta="length(NEW.body) - length(OLD.body)")
    deleted = _SQLITE_UPSERT.format(tenant="OLD.tenant", delta="-length(OLD.body)")
    op.execute(f"CREATE TRIGGER executions_bytes_inserted AFTER INSERT ON executions BEGIN {inserted}; END")
    op.execute(
        "CREATE TRIGGER executions_bytes_updated AFTER UPDATE OF body ON executions"
        f" WHEN length(NEW.body) <> length(OLD.body) BEGIN {updated}; END"
    )
    op.execute(f"CREATE TRIGGER executions_bytes_deleted AFTER DELETE ON executions BEGIN {deleted}; END")
