"""AIP-158 pagination: page size bounds and opaque, tamper-evident page tokens."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

from flowport.server.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


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
        raise InvalidArgument(
            "page_token is not a token this server issued", violations=[("page_token", "malformed")]
        ) from None
    if fingerprint != _fingerprint(filters):
        raise InvalidArgument(
            "page_token was issued for a request with different filters",
            violations=[("page_token", "filters differ from the request that returned this token")],
        )
    return cursor
