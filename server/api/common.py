"""Checks and conversions every service shares."""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from flowport.server.auth.principal import NEEDS_OPERATOR, operator_metadata
from flowport.server.errors import AlreadyExists, InvalidArgument, PermissionDenied, shown

MAX_REQUEST_ID = 128


def check_request_id(request_id: str) -> None:
    """Idempotency keys are short opaque strings."""
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id is {len(request_id)} characters, at most {MAX_REQUEST_ID} are allowed",
            violations=[("request_id", f"at most {MAX_REQUEST_ID} characters")],
        )


def require(value: str, field: str) -> None:
    """INVALID_ARGUMENT naming `field` when `value` is empty."""
    if not value:
        raise InvalidArgument(f"{field} is required", violations=[(field, "required")])


def request_hash(message: Message) -> bytes:
    """A stable digest of a request, for idempotency keys."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


def idempotency_key(request_id: str, message: Message) -> tuple[str, bytes] | None:
    """(request_id, digest of `message`), or None when no request_id was given."""
    check_request_id(request_id)
    return (request_id, request_hash(message)) if request_id else None


def request_id_reused(request_id: str, what: str) -> AlreadyExists:
    """ALREADY_EXISTS for an idempotency key used before with another request."""
    return AlreadyExists(
        f"request_id {shown(request_id)} was already used {what}",
        reason="REQUEST_ID_REUSED",
        metadata={"request_id": request_id},
    )


def other_tenant_refused(what: str, tenant: str) -> PermissionDenied:
    """An admin of one tenant naming another (`what`: "manages the API keys"): the operator's only."""
    return PermissionDenied(
        f"an admin {what} of its own tenant, not of tenant {shown(tenant)}: that takes {NEEDS_OPERATOR}",
        reason="ROLE_REQUIRED",
        metadata=operator_metadata(),
    )
