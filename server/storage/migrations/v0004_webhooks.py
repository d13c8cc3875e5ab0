"""Webhooks and their deliveries."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

DUE = sa.text("state IN (1, 2)")  # PENDING, RETRYING
FINISHED = sa.text("state IN (3, 4)")  # SUCCEEDED, DEAD_LETTERED


def upgrade(op: Operations) -> None:
    op.create_table(
        "webhooks",
        # Unique per tenant, so a taken id reveals nothing across tenants.
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("webhook_id", sa.Text, nullable=False),
        sa.Column("create_us", sa.BigInteger, nullable=False),
        # HMAC key; NULL for unsigned deliveries. Kept out of `body`, which reads return.
        sa.Column("secret", sa.LargeBinary),
        sa.Column("body", sa.LargeBinary, nullable=False),  # flowport.v1.Webhook, without the secret
        sa.PrimaryKeyConstraint("tenant", "webhook_id"),
    )
    # One row per (event, webhook), written before the first attempt; it
    # carries the request body so a delivery survives a restart on its own.
    op.create_table(
        "webhook_deliveries",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("webhook_id", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("state", sa.BigInteger, nullable=False),  # flowport.v1.WebhookDelivery.State
        sa.Column("attempts", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_status_code", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("last_duration_us", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("next_attempt_us", sa.BigInteger),  # NULL once SUCCEEDED or DEAD_LETTERED
        sa.Column("create_us", sa.BigInteger, nullable=False),
        sa.Column("update_us", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),  # the event as JSON, exactly the bytes POSTed
    )
    op.create_index(
        "webhook_deliveries_by_webhook",
        "webhook_deliveries",
        ["tenant", "webhook_id", sa.text("create_us DESC"), sa.text("delivery_id DESC")],
    )
    # The due-delivery scan, partial so it stays as small as the backlog.
    op.create_index(
        "webhook_deliveries_due",
        "webhook_deliveries",
        ["state", "next_attempt_us"],
        sqlite_where=DUE,
        postgresql_where=DUE,
    )
    # Expiry of finished rows by age.
    op.create_index(
        "webhook_deliveries_finished",
        "webhook_deliveries",
        ["update_us"],
        sqlite_where=FINISHED,
        postgresql_where=FINISHED,
    )
