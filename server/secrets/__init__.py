"""Secrets: tenant values sealed at rest, opened only inside the nodes that use them.

- `keyring`: the AES-256 keys (primary first) and the key file's format;
- `source`: where a process gets its keyring, and noticing a rotation;
- `cipher`: AES-GCM sealing bound to (tenant, name);
- `vault`: sealing on PutSecret, opening for nodes (never for the API);
- `resolver`: `${secret:NAME}` inside HTTP and SQL nodes;
- `redaction`: masking values in outputs, error messages and log records;
- `rotation`: resealing everything under a new key while servers run.

Nothing is imported here: `settings` imports `keyring`, which must not
pull in the rest.
"""
