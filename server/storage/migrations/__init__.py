"""The schema, one migration per module: `vNNNN_name.py` with `upgrade(op)`.

Written with Alembic's operations (server/storage/migrate.py runs them), so
one source makes the same schema on SQLite and PostgreSQL. Integers are
BigInteger (microsecond timestamps do not fit 32 bits), bytes LargeBinary
(BLOB on SQLite, BYTEA on PostgreSQL). A migration, once released, is never
edited: a change is a new module.
"""
