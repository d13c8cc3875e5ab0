"""The audit log: append-only. Rows are inserted and read, never changed:
triggers refuse UPDATE and DELETE, so not even a bug in flowport (or a SQL
node pointed at the database) can rewrite history through SQL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

_SQLITE_TRIGGER = """
CREATE TRIGGER audit_log_no_{verb} BEFORE {VERB} ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be {done}');
END
"""
_POSTGRES_FUNCTION = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: rows cannot be %', lower(TG_OP) || 'd';
END
$$
"""
_POSTGRES_TRIGGER = """
CREATE TRIGGER audit_log_no_{verb} BEFORE {VERB} ON audit_log
FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()
"""


def upgrade(op: Operations) -> None:
    op.create_table(
        "audit_log",
        sa.Column("audit_id", sa.Text, primary_key=True),  # aud_<ULID>
        sa.Column("time_us", sa.BigInteger, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("code", sa.Text, nullable=False),  # gRPC status code name
        sa.Column("tenant", sa.Text, nullable=False),  # the caller's; '' when unauthenticated
        sa.Column("resource_tenant", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.AuditEvent, serialized
    )
    op.create_index("audit_log_by_time", "audit_log", [sa.text("time_us DESC"), sa.text("audit_id DESC")])
    op.create_index("audit_log_by_tenant", "audit_log", ["tenant", sa.text("time_us DESC")])
    op.create_index("audit_log_by_resource_tenant", "audit_log", ["resource_tenant", sa.text("time_us DESC")])
    op.create_index("audit_log_by_action", "audit_log", ["action", sa.text("time_us DESC")])
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute(_POSTGRES_FUNCTION)
    for verb, done in (("update", "updated"), ("delete", "deleted")):
        template = _POSTGRES_TRIGGER if postgres else _SQLITE_TRIGGER
        op.execute(template.format(verb=verb, VERB=verb.upper(), done=done))
