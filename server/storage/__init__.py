"""Durable state: the Store interface and its embedded SQLite engine."""

from flowport.server.storage.base import Deletion, IdempotencyConflict, IdempotentResult, Store
from flowport.server.storage.migrate import MigrationError
from flowport.server.storage.sqlite import SqliteStore

__all__ = ["Deletion", "IdempotencyConflict", "IdempotentResult", "MigrationError", "SqliteStore", "Store"]
