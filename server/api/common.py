"""Checks and conversions every service shares."""

from __future__ import annotations

import functools
import hashlib

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor
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


@functools.cache
def _output_only(descriptor: Descriptor) -> tuple[str, ...]:
    return tuple(
        field.name
        for field in descriptor.fields
        if field_behavior_pb2.OUTPUT_ONLY in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    )


def clear_output_only(message: Message) -> None:
    """Clear the fields the .proto marks OUTPUT_ONLY (the server's to set): a field added later is
    covered without a list to keep in step."""
    for name in _output_only(message.DESCRIPTOR):
        message.ClearField(name)
