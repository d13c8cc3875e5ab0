"""Bytes of remembered request ids, per tenant, for `--tenant-max-request-id-bytes`.

A call with a `request_id` leaves a record of its answer for a day
(`idempotency`), whatever happens to what it made: a tenant creating and
deleting with request ids would otherwise grow the table by its rate limit
times a day of answers. `request_id_bytes` holds each tenant's total, kept
by triggers on `idempotency` in the transaction of each insert and delete,
counted as in RECORD_BYTES; sharded on PostgreSQL by backend pid, as
`execution_bytes` is (migration 22), with the purge folding the rows of
connections gone. `idempotency_by_tenant` finds a tenant's oldest records.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

# A record's bytes: its answer, request id and method name, and 64 for the rest of the row (the
# request's hash, its time, the tenant) and its index entries.
RECORD_BYTES = "(length({row}.response) + length({row}.request_id) + length({row}.method) + 64)"

_SQLITE_UPSERT = (
    "INSERT INTO request_id_bytes (tenant, shard, bytes) VALUES ({tenant}, 0, {delta})"
    " ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes"
)
_PG_INSERTED = """
CREATE FUNCTION flowport_request_id_bytes_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO request_id_bytes (tenant, shard, bytes)
    VALUES (NEW.tenant, pg_backend_pid(), @NEW@)
    ON CONFLICT (tenant, shard) DO UPDATE SET bytes = request_id_bytes.bytes + excluded.bytes;
    RETURN NULL;
END $$
"""
_PG_DELETED = """
CREATE FUNCTION flowport_request_id_bytes_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO request_id_bytes (tenant, shard, bytes)
    SELECT tenant, pg_backend_pid(), -sum(@gone@) FROM gone GROUP BY tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET bytes = request_id_bytes.bytes + excluded.bytes;
    RETURN NULL;
END $$
"""


def upgrade(op: Operations) -> None:
    op.create_table(
        "request_id_bytes",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("shard", sa.Integer, primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_index("idempotency_by_tenant", "idempotency", ["tenant", "create_us"])
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # Processes of the earlier release keep writing while a deployment is rolled: held off from
        # here to the triggers' creation, so that no record is counted twice or not at all.
        op.execute("LOCK TABLE idempotency IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "INSERT INTO request_id_bytes (tenant, shard, bytes)"  # noqa: S608 - fixed fragments
        f" SELECT tenant, 0, sum({RECORD_BYTES.format(row='idempotency')}) FROM idempotency GROUP BY tenant"
    )
    if postgresql:
        op.execute(_PG_INSERTED.replace("@NEW@", RECORD_BYTES.format(row="NEW")))
        op.execute(_PG_DELETED.replace("@gone@", RECORD_BYTES.format(row="gone")))
        op.execute(
            "CREATE TRIGGER idempotency_bytes_inserted AFTER INSERT ON idempotency"
            " FOR EACH ROW EXECUTE FUNCTION flowport_request_id_bytes_inserted()"
        )
        op.execute(
            "CREATE TRIGGER idempotency_bytes_deleted AFTER DELETE ON idempotency"
            " REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION flowport_request_id_bytes_deleted()"
        )
        return
    inserted = _SQLITE_UPSERT.format(tenant="NEW.tenant", delta=RECORD_BYTES.format(row="NEW"))
    deleted = _SQLITE_UPSERT.format(tenant="OLD.tenant", delta="-" + RECORD_BYTES.format(row="OLD"))
    op.execute(f"CREATE TRIGGER idempotency_bytes_inserted AFTER INSERT ON idempotency BEGIN {inserted}; END")
    op.execute(f"CREATE TRIGGER idempotency_bytes_deleted AFTER DELETE ON idempotency BEGIN {deleted}; END")
