"""What the services need from storage, independent of the engine behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flowport.v1 import session_pb2


@dataclass(frozen=True)
class IdempotentResult:
    """Outcome of a create guarded by an idempotency key."""

    response: bytes
    """The serialized response of the first call with this key."""
    replayed: bool
    """True when the key was seen before and `response` is the first call's."""


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""


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

    async def get_session(self, tenant: str, session_id: str, now_us: int) -> session_pb2.Session | None:
        """The session, or None when absent, another tenant's, or expired."""

    async def list_sessions(
        self, tenant: str, *, user_id: str, after: tuple[int, str] | None, limit: int, now_us: int
    ) -> list[session_pb2.Session]:
        """Unexpired sessions, newest first, strictly after the (create_us, id) cursor."""

    async def delete_session(self, tenant: str, session_id: str, now_us: int, request_id: str = "") -> bool:
        """Delete; False when there was no such unexpired session.

        With `request_id`, a repeat of a delete that succeeded returns True;
        raises IdempotencyConflict when the key deleted another session.
        """

    async def count_active_sessions(self, now_us: int) -> int:
        """Unexpired sessions across tenants."""

    async def purge_expired(self, now_us: int, idempotency_before_us: int) -> int:
        """Delete expired sessions and old idempotency records; return rows removed."""
