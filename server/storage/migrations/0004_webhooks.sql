-- Webhooks and their deliveries.
CREATE TABLE webhooks (
    tenant      TEXT    NOT NULL,
    webhook_id  TEXT    NOT NULL,  -- unique per tenant, so a taken id reveals nothing across tenants
    create_us   INTEGER NOT NULL,
    secret      BLOB,              -- HMAC key; NULL for unsigned deliveries. Kept out of `body`,
                                   -- which is what reads return.
    body        BLOB    NOT NULL,  -- flowport.v1.Webhook, serialized, without the secret
    PRIMARY KEY (tenant, webhook_id)
);

-- One row per (event, webhook), written before the first attempt; it
-- carries the request body so a delivery survives a restart on its own.
CREATE TABLE webhook_deliveries (
    delivery_id       TEXT    NOT NULL PRIMARY KEY,
    tenant            TEXT    NOT NULL,
    webhook_id        TEXT    NOT NULL,
    event_id          TEXT    NOT NULL,
    event_type        TEXT    NOT NULL,
    state             INTEGER NOT NULL,            -- flowport.v1.WebhookDelivery.State
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_status_code  INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT    NOT NULL DEFAULT '',
    last_duration_us  INTEGER NOT NULL DEFAULT 0,
    next_attempt_us   INTEGER,                     -- NULL once SUCCEEDED or DEAD_LETTERED
    create_us         INTEGER NOT NULL,
    update_us         INTEGER NOT NULL,
    payload           BLOB    NOT NULL             -- the event as JSON, exactly the bytes POSTed
);
CREATE INDEX webhook_deliveries_by_webhook
    ON webhook_deliveries (tenant, webhook_id, create_us DESC, delivery_id DESC);
-- The due-delivery scan: PENDING (1) and RETRYING (2) rows by due time.
-- Partial, so it stays as small as the backlog however many rows are kept.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_us) WHERE state IN (1, 2);
-- Expiry of SUCCEEDED (3) and DEAD_LETTERED (4) rows by age.
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (update_us) WHERE state IN (3, 4);
