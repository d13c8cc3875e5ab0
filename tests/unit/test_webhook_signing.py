"""X-Flowport-Signature: signing on the server, verification in the client SDK."""

from __future__ import annotations

import base64

import pytest

from flowport.clients.webhooks import SignatureError, require_signature, verify_signature
from flowport.server.webhooks.signing import parse_header, sign, signature

SECRET = b"whsec-0123456789abcdef"
BODY = b'{"id":"42","type":"execution.completed","data":{"n":1}}'
T = 1_700_000_000


def test_round_trip() -> None:
    header = sign(SECRET, BODY, T)
    assert header.startswith(f"t={T},v1=")
    assert verify_signature(SECRET, header, BODY, now=T)
    # A str secret is its UTF-8 bytes.
    assert verify_signature(SECRET.decode(), header, BODY, now=T + 10)
    require_signature(SECRET, header, BODY, now=T)


def test_tampering_is_detected() -> None:
    header = sign(SECRET, BODY, T)
    assert not verify_signature(SECRET, header, BODY.replace(b'"n":1', b'"n":2'), now=T)
    assert not verify_signature(SECRET, header, BODY + b" ", now=T)
    # The timestamp is signed too: moving it (to dodge the tolerance) breaks the signature.
    assert not verify_signature(SECRET, header.replace(f"t={T}", f"t={T + 1}"), BODY, now=T)
    assert not verify_signature(b"another-secret-of-16+bytes", header, BODY, now=T)


def test_tolerance() -> None:
    header = sign(SECRET, BODY, T)
    assert verify_signature(SECRET, header, BODY, tolerance=300, now=T + 300)
    assert verify_signature(SECRET, header, BODY, tolerance=300, now=T - 300)
    assert not verify_signature(SECRET, header, BODY, tolerance=300, now=T + 301)
    assert not verify_signature(SECRET, header, BODY, tolerance=300, now=T - 301)  # from the future
    assert not verify_signature(SECRET, header, BODY, tolerance=5, now=T + 6)


def test_any_of_several_signatures_matches_for_rotation() -> None:
    old, new = b"old-secret-0123456789", b"new-secret-0123456789"
    header = f"t={T},v1={signature(old, BODY, T)},v1={signature(new, BODY, T)}"
    assert verify_signature(old, header, BODY, now=T)
    assert verify_signature(new, header, BODY, now=T)
    assert not verify_signature(SECRET, header, BODY, now=T)
    # Schemes this verifier does not know are ignored, not an error.
    assert verify_signature(SECRET, f"t={T},v2=abc,v1={signature(SECRET, BODY, T)}", BODY, now=T)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"t={T}",
        "v1=" + "0" * 64,
        f"t=abc,v1={'0' * 64}",
        f"t={T},t={T},v1={'0' * 64}",
        f"t={T},v1=XYZ",
        f"t={T},v1={'0' * 63}",
        f"t={T},v1",
        f"t={T},v1={'0' * 64}" + ",v1=" + "0" * 64 * 100,
    ],
)
def test_malformed_headers_are_refused(header: str) -> None:
    assert not verify_signature(SECRET, header, BODY, now=T)


def test_require_signature_says_why() -> None:
    with pytest.raises(SignatureError, match="no X-Flowport-Signature"):
        require_signature(SECRET, None, BODY, now=T)
    with pytest.raises(SignatureError, match="malformed"):
        require_signature(SECRET, "t=1", BODY, now=T)
    with pytest.raises(SignatureError, match="tolerance"):
        require_signature(SECRET, sign(SECRET, BODY, T), BODY, now=T + 1000)
    with pytest.raises(SignatureError, match="no signature matches"):
        require_signature(b"wrong-secret-0123456789", sign(SECRET, BODY, T), BODY, now=T)


def test_header_never_contains_the_secret() -> None:
    header = sign(SECRET, BODY, T)
    for form in (SECRET, SECRET.hex().encode(), base64.b64encode(SECRET), base64.urlsafe_b64encode(SECRET)):
        assert form.decode() not in header
    parsed = parse_header(header)
    assert parsed is not None and parsed.timestamp == T and len(parsed.signatures) == 1
