-- Secrets: values only as AES-256-GCM ciphertext, bound to (tenant, name).
CREATE TABLE secrets (
    tenant      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    description TEXT    NOT NULL,
    version     INTEGER NOT NULL,  -- 1 at creation, +1 on every change
    create_us   INTEGER NOT NULL,
    update_us   INTEGER NOT NULL,
    key_id      TEXT    NOT NULL,  -- the keyring key that sealed the value
    sealed      BLOB    NOT NULL,  -- nonce || ciphertext || tag
    PRIMARY KEY (tenant, name)
);
-- Key rotation finds the rows still sealed with an old key.
CREATE INDEX secrets_by_key ON secrets (key_id);
