"""The `X-Flowport-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.

The HMAC covers `"<t>.<body>"`, so a captured delivery cannot be replayed
later under a fresh timestamp. A header may carry several `v1=` values (one
per secret while a secret is rotated); keys other than `t` and `v1` are
ignored so a future scheme can be added beside v1.

Standard library only: the client-side verifier (`flowport.clients.webhooks`)
parses with the same code the server signs with.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

HEADER = "X-Flowport-Signature"
SCHEME = "v1"
# Bounds parsing work on a header an attacker controls.
MAX_HEADER_LENGTH = 4096
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The hex v1 signature of `body` sent at `timestamp`."""
    return hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The header value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},{SCHEME}={signature(secret, body, timestamp)}"


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    """A well-formed header: its timestamp and every v1 signature in it."""

    timestamp: int
    signatures: tuple[str, ...]


def parse_header(header: str) -> ParsedSignature | None:
    """The header's parts, or None unless it has exactly one `t` and at least one `v1`."""
    if len(header) > MAX_HEADER_LENGTH:
        return None
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            if timestamp is not None or not _DIGITS.match(value):
                return None
            timestamp = int(value)
        elif key == SCHEME:
            if not _HEX_DIGEST.match(value):
                return None
            signatures.append(value)
    if timestamp is None or not signatures:
        return None
    return ParsedSignature(timestamp, tuple(signatures))
