"""Durable state: the tables, their SQL engines, and the choice between them.

`SqlStore` is the store: one class made of table groups (`SessionTables`,
`WorkflowTables`, ... in the modules named for them), each holding its SQL
once for both engines (`SqliteStore`, `PostgresStore`). Components type
their store as the one table group they use, or as `SqlStore` when they use
several; there is no separate interface to keep in step with the SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowport.server.storage.base import Deletion, IdempotencyConflict, IdempotentResult
from flowport.server.storage.migrate import MigrationError
from flowport.server.storage.quotas import TenantQuotas
from flowport.server.storage.sql_store import SqlStore
from flowport.server.storage.sqlite import SqliteStore

if TYPE_CHECKING:
    from flowport.server.settings import Settings

__all__ = [
    "Deletion",
    "IdempotencyConflict",
    "IdempotentResult",
    "MigrationError",
    "SqlStore",
    "SqliteStore",
    "open_store",
]


async def open_store(settings: Settings) -> SqlStore:
    """The store the settings name: PostgreSQL for a postgresql:// database_url, else SQLite in data_dir."""
    store: SqlStore
    if settings.database_url is None:
        store = await SqliteStore.open(settings.database_path)
    else:
        # Imported here: the embedded default never loads the PostgreSQL driver.
        from flowport.server.storage.postgres import PostgresStore

        store = await PostgresStore.open(settings.database_url.get_secret_value())
    store.quotas = TenantQuotas(
        objects=settings.tenant_max_objects or None,
        sessions=settings.tenant_max_sessions or None,
        webhooks=settings.tenant_max_webhooks or None,
        object_bytes=settings.tenant_max_object_bytes or None,
    )
    return store
