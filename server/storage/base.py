"""Results and errors every table group shares, independent of the engine behind it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
