-- Sessions, and idempotency records for every mutating call.
CREATE TABLE sessions (
    tenant      TEXT    NOT NULL,
    session_id  TEXT    NOT NULL PRIMARY KEY,
    user_id     TEXT    NOT NULL,
    create_us   INTEGER NOT NULL,
    expire_us   INTEGER NOT NULL,
    body        BLOB    NOT NULL  -- flowport.v1.Session, serialized
);
CREATE INDEX sessions_by_tenant_time ON sessions (tenant, create_us DESC, session_id DESC);
CREATE INDEX sessions_by_expiry ON sessions (expire_us);

CREATE TABLE idempotency (
    tenant        TEXT    NOT NULL,
    method        TEXT    NOT NULL,
    request_id    TEXT    NOT NULL,
    request_hash  BLOB    NOT NULL,
    response      BLOB    NOT NULL,
    create_us     INTEGER NOT NULL,
    PRIMARY KEY (tenant, method, request_id)
);
CREATE INDEX idempotency_by_time ON idempotency (create_us);
