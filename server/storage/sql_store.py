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
from flowport.server.storage.group_commit import GroupWriter, QueryTiming, log_unretrieved
from flowport.server.storage.request_ids import RequestIdTables
from flowport.server.storage.resources import ResourceTables
from flowport.server.storage.secrets import SecretTables
from flowport.server.storage.services import ServiceTables
from flowport.server.storage.sessions import SessionTables
from flowport.server.storage.stats import StatsTables
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
    RequestIdTables,
    StatsTables,
):
    """Durable state on a SQL engine; open one with `open_store` (server/storage/__init__.py)."""

    _group: GroupWriter[Any]

    async def close(self) -> None:
        """Commit what is queued and release connections and threads."""
        raise NotImplementedError

    async def ping(self) -> None:
        """Round-trip to the database; raises when it is unusable."""
        raise NotImplementedError

    def timings(self) -> list[QueryTiming]:
        """One per connection: operations, their time, in use now."""
        raise NotImplementedError

    def query_figures(self) -> tuple[int, int, int, float]:
        """(connections, in use now, operations since start, mean operation time in ms)."""
        timings = self.timings()
        count = sum(t.count for t in timings)
        seconds = sum(t.seconds for t in timings)
        return len(timings), sum(t.active for t in timings), count, 1000 * seconds / count if count else 0.0

    def observe_queries(self, observe: Callable[[str, float], None]) -> None:
        """Report every operation's time to `observe(operation, seconds)` (Prometheus)."""
        for timing in self.timings():
            timing.observe = lambda seconds, operation=timing.operation: observe(operation, seconds)

    async def _write(self, op: Callable[[Connection], T]) -> T:
        try:
            return await self._group.submit(op)
        except IdempotencyRace:
            # Its savepoint was rolled back; run again, the lookup now sees
            # the other process's record and answers with its response.
            return await self._group.submit(op)

    def _write_soon(
        self, op: Callable[[Connection], object], done: Callable[[BaseException | None], None] | None = None
    ) -> None:
        future = self._group.enqueue(op)
        if done is None:
            # Nobody awaits a queued write, so its failure is logged.
            future.add_done_callback(log_unretrieved)
        else:
            future.add_done_callback(lambda f: None if f.cancelled() else done(f.exception()))

    @property
    def write_batches(self) -> tuple[int, int]:
        """(transactions committed, writes in them) since open: the group-commit ratio."""
        return self._group.batches, self._group.writes
