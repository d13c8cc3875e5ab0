"""AIP-158 pagination: page size bounds and opaque page tokens bound to the request's filters.

Tokens are not signed: a client that crafts one only moves its cursor within
its own results (every query is scoped by tenant before the cursor applies).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import orjson
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from flowport.server.errors import InvalidArgument
from flowport.server.limits import MAX_PAGE_BYTES

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def bounded_map(entries: Iterable[tuple[str, dict[str, Any]]]) -> struct_pb2.Struct:
    """A JSON object of `entries` (key, value), as Kailash's maps keyed by id answer.

    Such a map has no room for a page token: it holds the first
    MAX_PAGE_SIZE entries that fit in MAX_PAGE_BYTES (at least one), as a
    page would, and the paged list of the same things has them all.
    """
    answer = struct_pb2.Struct()
    used = 0
    for key, value in entries:
        size = len(key) + len(orjson.dumps(value)) + 4
        if len(answer) >= MAX_PAGE_SIZE or (answer and used + size > MAX_PAGE_BYTES):
            break
        answer[key] = value
        used += size
    return answer


def page_size(requested: int) -> int:
    """The effective page size: default when 0, capped at the maximum."""
    if requested < 0:
        raise InvalidArgument(
            f"page_size must not be negative, got {requested}", violations=[("page_size", "must be >= 0")]
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(filters: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(filters, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def encode_token(cursor: list[Any], filters: dict[str, Any]) -> str:
    """A token for the page after `cursor`, valid only with the same filters."""
    payload = orjson.dumps({"c": cursor, "f": _fingerprint(filters)})
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_token(token: str, filters: dict[str, Any]) -> list[Any] | None:
    """The cursor in `token`, or None for the first page; INVALID_ARGUMENT if bad."""
    if not token:
        return None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor, fingerprint = data["c"], data["f"]
        if not isinstance(cursor, list):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise _malformed() from None
    if fingerprint != _fingerprint(filters):
        raise InvalidArgument(
            "page_token was issued for a request with different filters",
            violations=[("page_token", "filters differ from the request that returned this token")],
        )
    return cursor


def _malformed() -> InvalidArgument:
    return InvalidArgument("page_token is not a token this server issued", violations=[("page_token", "malformed")])


# What a cursor's parts may be: a token is not signed, so one a client made up must fail as a
# malformed token, not as a value the database refuses (an integer past 64 bits, a NUL in text).
_MAX_INT = 2**63 - 1
_MAX_KEY_CHARS = 1024


def _int_part(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise _malformed()
    return value


def _str_part(value: Any) -> str:
    if not isinstance(value, str) or len(value) > _MAX_KEY_CHARS or "\x00" in value:
        raise _malformed()
    return value


def cursor_str(cursor: list[Any] | None) -> str | None:
    """A one-string cursor ([key]) as its key; None for the first page."""
    if cursor is None:
        return None
    if len(cursor) != 1:
        raise _malformed()
    return _str_part(cursor[0])


def cursor_int(cursor: list[Any] | None) -> int | None:
    """A one-integer cursor ([id]) as its integer; None for the first page."""
    if cursor is None:
        return None
    if len(cursor) != 1:
        raise _malformed()
    return _int_part(cursor[0])


def cursor_time_id(cursor: list[Any] | None) -> tuple[int, str] | None:
    """A ([create_us, id]) cursor as a tuple; None for the first page."""
    if cursor is None:
        return None
    if len(cursor) != 2:
        raise _malformed()
    return _int_part(cursor[0]), _str_part(cursor[1])


def page(
    rows: Sequence[T],
    size: int,
    filters: dict[str, Any],
    cursor: Callable[[T], list[Any]],
    max_bytes: int = MAX_PAGE_BYTES,
) -> tuple[list[T], str]:
    """Split `size + 1` fetched rows into the page and the token for the next one.

    Fetching one row more than the page tells whether another page exists
    without a count query. A page of messages also ends before it would
    exceed `max_bytes` (with at least one row in it): the rest come with
    the next token, so a page never outgrows what REST and gRPC carry.
    """
    count = min(len(rows), size)
    total = 0
    for i in range(count):
        row = rows[i]
        if isinstance(row, Message):
            total += row.ByteSize() + 8  # with its tag and length in the response
            if total > max_bytes and i > 0:
                count = i
                break
    if count == len(rows):
        return list(rows), ""
    return list(rows[:count]), encode_token(cursor(rows[count - 1]), filters)
