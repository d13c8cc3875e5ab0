"""Verify that a webhook delivery came from flowport and was not altered.

    from flowport.clients.webhooks import verify_signature

    ok = verify_signature(secret, request.headers["X-Flowport-Signature"], raw_body)

Pass the body exactly as received (bytes, before any JSON parsing): the
signature covers those bytes. A delivery is accepted when its timestamp is
within `tolerance` seconds of now (so a captured request cannot be replayed
later) and any of its `v1=` signatures matches (so deliveries keep verifying
while a secret is rotated). Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
import time

from flowport.server.webhooks.signing import HEADER, parse_header, signature

__all__ = ["HEADER", "SignatureError", "require_signature", "verify_signature"]

DEFAULT_TOLERANCE = 300.0


class SignatureError(Exception):
    """The delivery's signature is missing, malformed, stale or does not match."""


def require_signature(
    secret: str | bytes, header: str | None, body: bytes, tolerance: float = DEFAULT_TOLERANCE, now: float | None = None
) -> None:
    """Return when the delivery is authentic; raise SignatureError saying why not."""
    if not header:
        raise SignatureError(f"no {HEADER} header")
    parsed = parse_header(header)
    if parsed is None:
        raise SignatureError(f"malformed {HEADER} header")
    current = time.time() if now is None else now
    if abs(current - parsed.timestamp) > tolerance:
        raise SignatureError("signature timestamp is outside the tolerance")
    key = secret.encode() if isinstance(secret, str) else secret
    expected = signature(key, body, parsed.timestamp)
    # Every candidate is compared, so timing says nothing about which matched.
    matched = False
    for candidate in parsed.signatures:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no signature matches")


def verify_signature(
    secret: str | bytes, header: str | None, body: bytes, tolerance: float = DEFAULT_TOLERANCE, now: float | None = None
) -> bool:
    """True when the delivery is authentic (see `require_signature` for why it is not)."""
    try:
        require_signature(secret, header, body, tolerance, now)
    except SignatureError:
        return False
    return True
