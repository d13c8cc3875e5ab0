-- API keys: only a hash of each key is kept.
CREATE TABLE api_keys (
    key_id     TEXT    NOT NULL PRIMARY KEY,
    tenant     TEXT    NOT NULL,
    key_hash   BLOB    NOT NULL UNIQUE,  -- SHA-256 of the whole key
    create_us  INTEGER NOT NULL,
    expire_us  INTEGER,                  -- NULL: never expires
    revoke_us  INTEGER,                  -- NULL: not revoked
    body       BLOB    NOT NULL          -- flowport.v1.ApiKey, serialized
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant, create_us DESC);
