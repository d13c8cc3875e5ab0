"""Workflow versions and executions."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

# PENDING (1) and RUNNING (2): the executions looked up at start-up.
UNFINISHED = sa.text("state IN (1, 2)")


def upgrade(op: Operations) -> None:
    op.create_table(
        "workflows",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("workflow_id", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("deleted_us", sa.BigInteger),  # set on delete; executions may still need the version
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.Workflow, serialized
        sa.PrimaryKeyConstraint("tenant", "workflow_id", "version"),
    )
    op.create_table(
        "executions",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("execution_id", sa.Text, primary_key=True),
        sa.Column("workflow_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("state", sa.BigInteger, nullable=False),  # flowport.v1.Execution.State
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.Execution, serialized
    )
    op.create_index(
        "executions_by_tenant_time",
        "executions",
        ["tenant", sa.text("create_us DESC"), sa.text("execution_id DESC")],
    )
    op.create_index("executions_by_workflow", "executions", ["tenant", "workflow_id", sa.text("create_us DESC")])
    op.create_index(
        "executions_unfinished", "executions", ["state"], sqlite_where=UNFINISHED, postgresql_where=UNFINISHED
    )
