"""What the services need from storage, independent of the engine behind it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from flowport.server.events.bus import BusEvent
from flowport.v1 import execution_pb2, session_pb2, workflow_pb2


@dataclass(frozen=True)
class IdempotentResult:
    """Outcome of a create guarded by an idempotency key."""

    response: bytes
    """The serialized response of the first call with this key."""
    replayed: bool
    """True when the key was seen before and `response` is the first call's."""


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""


class IdempotencyRace(Exception):
    """Another process recorded the same idempotency key while this write ran (retried by the store)."""


class Deletion(Enum):
    """Outcome of a delete guarded by an idempotency key."""

    DELETED = "deleted"
    REPLAYED = "replayed"  # a repeat of a delete that succeeded: report success, announce nothing again
    MISSING = "missing"

    @property
    def done(self) -> bool:
        """Whether the caller is told the delete succeeded."""
        return self is not Deletion.MISSING


@dataclass(frozen=True)
class ExpiredExecution:
    """An unfinished execution whose lease ended: up for another process to take."""

    execution_id: str
    tenant: str
    owner: str
    """The process that last held it; '' while it waits in the work queue, never taken."""


class Store(Protocol):
    """Durable state. Every read and write is scoped to a tenant."""

    async def ping(self) -> None:
        """Round-trip to the database; raises when it is unusable."""

    async def close(self) -> None:
        """Release connections and threads."""

    async def create_session(
        self, tenant: str, session: session_pb2.Session, idempotency: tuple[str, bytes] | None
    ) -> IdempotentResult:
        """Insert `session`; with (request_id, request_hash), at most once per key.

        Raises IdempotencyConflict when the key was used with another hash.
        """

    async def get_session(
        self, tenant: str, session_id: str, now_us: int, creator: str | None = None
    ) -> session_pb2.Session | None:
        """The session, or None when absent, another tenant's, expired, or (with `creator`) someone else's."""

    async def list_sessions(
        self,
        tenant: str,
        *,
        user_id: str,
        after: tuple[int, str] | None,
        limit: int,
        now_us: int,
        creator: str | None = None,
    ) -> list[session_pb2.Session]:
        """Unexpired sessions, newest first, strictly after the (create_us, id) cursor; only `creator`'s if given."""

    async def count_listed_sessions(self, tenant: str, *, user_id: str, now_us: int, creator: str | None = None) -> int:
        """How many sessions list_sessions' pages hold in all (the same filters, no cursor)."""

    async def delete_session(
        self, tenant: str, session_id: str, now_us: int, request_id: str = "", creator: str | None = None
    ) -> Deletion:
        """Delete; MISSING when there was no such unexpired session (of `creator`'s, if given).

        With `request_id`, a repeat of a delete that succeeded is REPLAYED;
        raises IdempotencyConflict when the key deleted another session.
        """

    async def session_exists(self, tenant: str, session_id: str, now_us: int, creator: str | None = None) -> bool:
        """Whether an unexpired session with this id exists in the tenant (of `creator`'s, if given)."""

    async def session_owner(self, tenant: str, session_id: str) -> str | None:
        """The credential that created the session, expired, deleted or removed (then as its executions
        and workflows recorded it); None when unknown. Cached: it never changes."""

    async def count_active_sessions(self, now_us: int) -> int:
        """Unexpired sessions across tenants."""

    async def purge_expired(self, now_us: int, idempotency_before_us: int) -> int:
        """Delete expired sessions and old idempotency records; return rows removed."""

    async def create_workflow(
        self, tenant: str, workflow: workflow_pb2.Workflow, idempotency_key: tuple[str, bytes] | None
    ) -> IdempotentResult:
        """Store the next version of `workflow`'s name; `response` is the stored Workflow."""

    async def get_workflow(
        self,
        tenant: str,
        workflow_id: str,
        version: int = 0,
        *,
        include_deleted: bool = False,
        session_creator: str | None = None,
    ) -> workflow_pb2.Workflow | None:
        """A version (0: the latest), or None; with `session_creator`, only among the versions
        created outside sessions or in that credential's."""

    async def list_workflows(
        self, tenant: str, *, session_id: str, after: str | None, limit: int, session_creator: str | None = None
    ) -> list[workflow_pb2.Workflow]:
        """Latest version of each workflow, ordered by id, after `after` (`session_creator` as for get_workflow)."""

    async def count_listed_workflows(self, tenant: str, *, session_id: str, session_creator: str | None = None) -> int:
        """How many workflows list_workflows' pages hold in all (the same filters, no cursor)."""

    async def delete_workflow(
        self, tenant: str, workflow_id: str, now_us: int, request_id: str = "", session_creator: str | None = None
    ) -> Deletion:
        """Hide every version (`session_creator`: every one it may see); MISSING when there was none
        (REPLAYED as for delete_session)."""

    async def insert_execution(
        self,
        tenant: str,
        execution: execution_pb2.Execution,
        idempotency_key: tuple[str, bytes] | None,
        *,
        owner: str = "",
        lease_until_us: int = 0,
    ) -> IdempotentResult:
        """Record a new execution leased to `owner`; `response` is the (first) execution's id."""

    async def claim_executions(
        self,
        owner: str,
        *,
        now_us: int,
        lease_until_us: int,
        expired_only: bool = True,
        execution_ids: Collection[str] | None = None,
    ) -> list[execution_pb2.Execution]:
        """Take over unfinished executions whose lease expired (all unfinished ones with expired_only=False),
        only those of `execution_ids` when given."""

    async def expired_executions(self, now_us: int) -> list[ExpiredExecution]:
        """Unfinished executions whose lease ended before `now_us`, oldest first."""

    async def defer_queued_executions(self, execution_ids: Collection[str], *, now_us: int, until_us: int) -> list[str]:
        """Of `execution_ids`, those still queued (unowned, unfinished, check time passed), next checked at `until_us`.

        Only one of several processes sweeping at once gets each."""

    async def count_queued_executions(self, tenant: str) -> int:
        """`tenant`'s executions waiting in the work queue (unowned and unfinished)."""

    async def expire_leases_except(self, owner: str) -> None:
        """End every unfinished execution's lease but `owner`'s (no other process shares the store)."""

    async def claim_execution(
        self, tenant: str, execution_id: str, owner: str, *, now_us: int, lease_until_us: int
    ) -> execution_pb2.Execution | None:
        """Take one unfinished execution that is unowned (queued) or whose lease expired; None otherwise."""

    async def renew_leases(self, owner: str, lease_until_us: int, execution_ids: Collection[str] | None = None) -> None:
        """Extend the leases of `owner`'s unfinished executions (only `execution_ids`, when given)."""

    async def execution_lease(self, tenant: str, execution_id: str) -> tuple[str, int] | None:
        """(owner, lease_until_us) of an execution; None when absent or another tenant's."""

    async def release_leases(self, owner: str) -> None:
        """Let other processes take `owner`'s unfinished executions at once."""

    async def replayed_execution(self, tenant: str, idempotency_key: tuple[str, bytes]) -> str | None:
        """The execution id a CreateExecution key already made, or None; IdempotencyConflict for another request."""

    async def save_execution(self, execution: execution_pb2.Execution, *, wait: bool = True) -> None:
        """Write an execution's current state; `wait=False` queues it (committed in order)."""

    async def get_execution(self, tenant: str, execution_id: str) -> execution_pb2.Execution | None:
        """The execution, or None."""

    async def list_executions(
        self,
        tenant: str,
        *,
        workflow_id: str,
        session_id: str,
        state: int,
        after: tuple[int, str] | None,
        limit: int,
        session_creator: str | None = None,
    ) -> list[execution_pb2.Execution]:
        """Executions newest first, filtered, after the (create_us, id) cursor; with `session_creator`,
        only those outside sessions or in that credential's."""

    async def count_listed_executions(
        self, tenant: str, *, workflow_id: str, session_id: str, state: int, session_creator: str | None = None
    ) -> int:
        """How many executions list_executions' pages hold in all (the same filters, no cursor)."""

    async def read_recent_events(
        self,
        tenant: str,
        *,
        before: int | None,
        limit: int,
        session_id: str = "",
        workflow_id: str = "",
        execution_id: str = "",
    ) -> list[BusEvent]:
        """A tenant's logged events with id < `before` (None: any), newest first, filtered by the ids given."""
