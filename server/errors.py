"""The error hierarchy: services raise these, one interceptor maps them.

Each error becomes a `google.rpc.Status` with an `ErrorInfo` (reason, domain
`flowport.dev`, metadata) and, where given, `BadRequest` field violations or
`RetryInfo`. Envoy's transcoder turns that status into the JSON body and HTTP
status REST clients see, so the mapping lives here once.

Errors never echo a client's value whole: `shown(value)` quotes at most a
short prefix, marked as cut, and every error caps its own message, field
violations and metadata, and its whole status, so the grpc-message and
grpc-status-details-bin trailers stay far below what Envoy and gRPC clients
accept (an oversized trailer is a reset stream: a 502, and a strike toward
Envoy ejecting the server).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from itertools import islice
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "flowport.dev"

# How much of a client's value an error quotes.
SHOWN_CHARS = 200
# Caps every error applies to what it carries, whatever its call site passed.
MAX_MESSAGE_BYTES = 1024  # UTF-8; grpc-message percent-encodes non-ASCII to 3x this
MAX_FIELD_CHARS = 300
MAX_DESCRIPTION_CHARS = 600
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
MAX_METADATA_ENTRIES = 16
# Field violations an error keeps (a status holds fewer); the rest are only counted.
MAX_VIOLATIONS = 100
# The serialized status (message included); base64 in grpc-status-details-bin
# makes it 4/3 larger. With the message that stays under gRPC's 8 KiB
# default metadata limit, where clients start refusing trailers.
MAX_STATUS_BYTES = 3072
MAX_INFO_BYTES = 1024  # ErrorInfo: entries of metadata that do not fit are left out
OMITTED_KEY = "violations_omitted"
CUT = "\u2026"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as an error quotes it: repr() of at most `limit` characters,
    e.g. `'abc…' (40000 characters, cut)` for a long string."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        text = repr(value[:limit] + CUT)
        if len(text) > limit + 3:  # escapes (control characters) made the repr longer
            text = text[:limit] + CUT + text[0]
        return f"{text} ({len(value)} characters, cut)"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}{CUT} ({len(text)} characters, cut)"


def cut(text: str, limit: int) -> str:
    """`text` as is when it has at most `limit` characters, else its start marked as cut."""
    if len(text) <= limit:
        return text
    return f"{text[: max(0, limit - 40)]}{CUT} ({len(text)} characters, cut)"


def _fit(text: str, limit: int) -> str:
    """`text` within `limit` bytes of UTF-8, marked as cut when it was longer."""
    if len(text) <= limit // 4:
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    kept = data[: max(0, limit - 48)].decode("utf-8", "ignore")
    return f"{kept}{CUT} ({len(text)} characters, cut)"


class FlowportError(Exception):
    """Root of every error a flowport service raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[tuple[str, str]] = (),
        retry_delay: float | None = None,
    ) -> None:
        # Capped here, so every path that reports the error (the status, the
        # grpc-message trailer, a stream's in-band error event) carries the same.
        message = _fit(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.reason = cut(reason or self.default_reason, MAX_METADATA_KEY_CHARS)
        self.metadata = {
            cut(str(k), MAX_METADATA_KEY_CHARS): cut(str(v), MAX_METADATA_VALUE_CHARS)
            for k, v in list((metadata or {}).items())[:MAX_METADATA_ENTRIES]
        }
        # The first ones only, so a caller's list of millions is never copied whole.
        items = iter(violations)
        self.violations = [
            (cut(str(f), MAX_FIELD_CHARS), cut(str(d), MAX_DESCRIPTION_CHARS)) for f, d in islice(items, MAX_VIOLATIONS)
        ]
        rest = len(violations) - len(self.violations) if isinstance(violations, Sized) else sum(1 for _ in items)
        self.violations_omitted = rest
        self.retry_delay = retry_delay

    def to_status(self) -> status_pb2.Status:
        """The `google.rpc.Status` this error is reported as, at most MAX_STATUS_BYTES serialized.

        Field violations that do not fit are left out (the first ones are
        kept); ErrorInfo's metadata then says how many (`violations_omitted`).
        """
        status = status_pb2.Status(code=_CODE_NUMBERS[self.code], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        for key, value in self.metadata.items():
            info.metadata[key] = value
            if info.ByteSize() > MAX_INFO_BYTES:
                del info.metadata[key]
        # The room left once the fixed parts and a worst-case omitted count are in.
        fixed = status.ByteSize() + _packed_size(info) + len(OMITTED_KEY) + 16
        retry = None
        if self.retry_delay is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay * 1e9))
            retry = error_details_pb2.RetryInfo(retry_delay=delay)
            fixed += _packed_size(retry)
        bad_request = error_details_pb2.BadRequest()
        room = MAX_STATUS_BYTES - fixed - 64  # the BadRequest's own Any wrapper
        for field, description in self.violations:
            violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            if violation.ByteSize() + 8 > room and not bad_request.field_violations:
                # The first violation is always there, shortened to fit.
                short = _fit(field, room // 4)
                violation = error_details_pb2.BadRequest.FieldViolation(
                    field=short, description=_fit(description, room - len(short.encode()) - 16)
                )
            if violation.ByteSize() + 8 > room:
                break
            bad_request.field_violations.append(violation)
            room -= violation.ByteSize() + 8
        omitted = len(self.violations) - len(bad_request.field_violations) + self.violations_omitted
        if omitted:
            info.metadata[OMITTED_KEY] = str(omitted)
        details: list[Any] = [info]
        if bad_request.field_violations:
            details.append(bad_request)
        if retry is not None:
            details.append(retry)
        for detail in details:
            status.details.add().Pack(detail)
        return status


def _packed_size(detail: Any) -> int:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return int(packed.ByteSize()) + 4  # its tag and length in Status.details


class InvalidArgument(FlowportError):
    """The request is malformed; `violations` say which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(FlowportError):
    """The resource does not exist, or the caller may not know that it does."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(FlowportError):
    """The resource, or the idempotency key, is already taken."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(FlowportError):
    """The resource is not in a state that allows the call."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(FlowportError):
    """A cursor or position lies outside what the server keeps."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Aborted(FlowportError):
    """The call was cut short (e.g. a stream that fell behind); retry or resume."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(FlowportError):
    """A limit was reached; `retry_delay` says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unauthenticated(FlowportError):
    """No valid credential; the message never says which check failed."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(FlowportError):
    """Authenticated, but the caller's roles do not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class DeadlineExceeded(FlowportError):
    """The call ran out of the time it was given; what it started may still finish."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(FlowportError):
    """The RPC exists in the API but this server does not serve it yet."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Unavailable(FlowportError):
    """A dependency is down; the call may succeed if retried."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Internal(FlowportError):
    """A bug or an unexpected failure; details are logged, not returned."""


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: code_pb2.OK,
    grpc.StatusCode.CANCELLED: code_pb2.CANCELLED,
    grpc.StatusCode.UNKNOWN: code_pb2.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
}
