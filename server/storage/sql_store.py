"""The store: every table mixin over one engine's connections.

SqliteStore (embedded) and PostgresStore (shared by several processes) differ
only in how they connect, begin a transaction and read a row; the SQL lives
once, in the mixins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flowport.server.storage.api_keys import ApiKeyTables
from flowport.server.storage.audit import AuditTables
from flowport.server.storage.base import IdempotencyRace
from flowport.server.storage.events import EventTables
from flowport.server.storage.executions import ExecutionTables
from flowport.server.storage.group_commit import GroupWriter, log_unretrieved
from flowport.server.storage.resources import ResourceTables
from flowport.server.storage.secrets import SecretTables
from flowport.server.storage.services import ServiceTables
from flowport.server.storage.sessions import SessionTables
from flowport.server.storage.tables import Connection
from flowport.server.storage.webhooks import WebhookTables
from flowport.server.storage.workflows import WorkflowTables

T = TypeVar("T")


class SqlStore(
    SessionTables,
    WorkflowTables,
    ExecutionTables,
    EventTables,
    WebhookTables,
    ApiKeyTables,
    AuditTables,
    SecretTables,
    ServiceTables,
    ResourceTables,
):
    """Durable state on a SQL engine; open one with `open_store` (server/storage/__init__.py)."""

    _group: GroupWriter[Any]

    async def close(self) -> None:
        """Commit what is queued and release connections and threads."""
        raise NotImplementedError

    async def ping(self) -> None:
        """Round-trip to the database; raises when it is unusable."""
        raise NotImplementedError

    async def _write(self, op: Callable[[Connection], T]) -> T:
        try:
            return await self._group.submit(op)
        except IdempotencyRace:
            # Its savepoint was rolled back; run again, the lookup now sees
            # the other process's record and answers with its response.
            return await self._group.submit(op)

    def _write_soon(self, op: Callable[[Connection], object]) -> None:
        # Nobody awaits a queued write, so its failure is logged.
        self._group.enqueue(op).add_done_callback(log_unretrieved)

    @property
    def write_batches(self) -> tuple[int, int]:
        """(transactions committed, writes in them) since open: the group-commit ratio."""
        return self._group.batches, self._group.writes
