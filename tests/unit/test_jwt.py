"""JWT bearer-token verification: good tokens, every refusal, and config checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from flowport.server.auth.jwt import MAX_TOKEN_LENGTH, JwtConfig, JwtConfigError, JwtVerifier
from flowport.server.auth.principal import AuthenticationFailed, Principal

SECRET = b"0123456789abcdef0123456789abcdef"  # exactly 32 bytes
ISSUER = "https://id.example.com"
AUDIENCE = "flowport"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str | None) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk["use"] = "sig"
    return jwk


def _write_jwks(path: Path, *keys: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    return _write_jwks(tmp_path / "jwks.json", _jwk(rsa_key, "rsa-1"), _jwk(ec_key, "ec-1"))


@pytest.fixture
def config(jwks_file: Path) -> JwtConfig:
    return JwtConfig(secret=SECRET, jwks_file=jwks_file, issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture
def verifier(config: JwtConfig) -> JwtVerifier:
    return JwtVerifier(config)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "ada",
        "tenant": "acme",
        "roles": ["admin", "user"],
        "iat": now,
        "exp": now + 300,
        "jti": "tok-1",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A compact JWS built without PyJWT, which refuses to make the forgeries tested here."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def _refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(AuthenticationFailed) as caught:
        verifier.verify(token)
    return caught.value.reason


# --- valid tokens ------------------------------------------------------------


def test_hs256_token(verifier: JwtVerifier) -> None:
    claims = _claims()
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert verifier.verify(token) == Principal(
        tenant="acme",
        subject="ada",
        roles=frozenset({"admin", "user"}),
        method="jwt",
        credential_id="tok-1",
        issuer=ISSUER,
        # Open streams end when exp plus the leeway passes.
        expires_at=claims["exp"] + verifier.config.leeway,
    )


def test_rs256_token(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    claims = _claims(roles=["user"])
    token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    principal = verifier.verify(token)
    assert principal == Principal(
        tenant="acme",
        subject="ada",
        roles=frozenset({"user"}),
        method="jwt",
        credential_id="tok-1",
        issuer=ISSUER,
        expires_at=claims["exp"] + verifier.config.leeway,
    )
    assert not principal.is_admin


def test_es256_token(verifier: JwtVerifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    claims = _claims(jti=None, tenant="t_2-b")
    token = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert verifier.verify(token) == Principal(
        tenant="t_2-b",
        subject="ada",
        roles=frozenset({"admin", "user"}),
        method="jwt",
        credential_id="",
        issuer=ISSUER,
        expires_at=claims["exp"] + verifier.config.leeway,
    )


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (None, {"user"}),  # absent: the default
        ("admin user", {"admin", "user"}),
        ("admin,user", {"admin", "user"}),
        (" admin , ", {"admin"}),
        (["user", "superuser", "Admin"], {"user"}),  # unknown names are dropped
        (["owner"], set()),  # present but nothing known: no roles, not the default
        ([], set()),
    ],
)
def test_roles_claim(verifier: JwtVerifier, roles: Any, expected: set[str]) -> None:
    token = jwt.encode(_claims(roles=roles), SECRET, algorithm="HS256")
    assert verifier.verify(token).roles == frozenset(expected)


@pytest.mark.parametrize("roles", [7, ["admin", 1], {"admin": True}])
def test_unreadable_roles_claim_is_refused(verifier: JwtVerifier, roles: Any) -> None:
    assert _refused(verifier, jwt.encode(_claims(roles=roles), SECRET, algorithm="HS256")) == "invalid roles claim"


def test_custom_claim_names() -> None:
    verifier = JwtVerifier(
        JwtConfig(secret=SECRET, algorithms=("HS256",), tenant_claim="org", subject_claim="email", roles_claim="scp")
    )
    token = jwt.encode(
        _claims(org="acme", email="ada@example.com", scp="admin", aud=None, iss=None), SECRET, algorithm="HS256"
    )
    principal = verifier.verify(token)
    assert (principal.tenant, principal.subject, principal.roles) == ("acme", "ada@example.com", frozenset({"admin"}))


def test_a_refresh_token_is_no_credential(verifier: JwtVerifier) -> None:
    for claim in (
        {"type": "refresh"},
        {"token_type": "Refresh"},
        {"type": "JWT", "token_type": "refresh"},
        {"typ": "Refresh"},
    ):
        assert _refused(verifier, jwt.encode(_claims(**claim), SECRET, algorithm="HS256")) == "refresh token"
    access = verifier.verify(jwt.encode(_claims(type="access"), SECRET, algorithm="HS256"))
    assert access.subject == "ada"


# --- time claims ---------------------------------------------------------------


def test_expired(verifier: JwtVerifier) -> None:
    now = int(time.time())
    token = jwt.encode(_claims(iat=now - 600, exp=now - 120), SECRET, algorithm="HS256")
    assert _refused(verifier, token) == "expired"


def test_not_yet_valid(verifier: JwtVerifier) -> None:
    now = int(time.time())
    assert _refused(verifier, jwt.encode(_claims(nbf=now + 120), SECRET, algorithm="HS256")) == "not yet valid"
    # Issued in the future beyond the leeway is just as wrong.
    assert _refused(verifier, jwt.encode(_claims(iat=now + 120), SECRET, algorithm="HS256")) == "not yet valid"


def test_within_leeway_is_accepted(verifier: JwtVerifier) -> None:
    now = int(time.time())
    token = jwt.encode(_claims(exp=now - 10, nbf=now + 10, iat=now + 10), SECRET, algorithm="HS256")
    assert verifier.verify(token).subject == "ada"


def test_exp_is_required_unless_turned_off(config: JwtConfig) -> None:
    token = jwt.encode(_claims(exp=None), SECRET, algorithm="HS256")
    assert _refused(JwtVerifier(config), token) == "missing exp claim"
    assert JwtVerifier(replace(config, require_exp=False)).verify(token).tenant == "acme"


# --- issuer and audience ---------------------------------------------------------


def test_wrong_issuer(verifier: JwtVerifier) -> None:
    assert _refused(verifier, jwt.encode(_claims(iss="https://evil"), SECRET, algorithm="HS256")) == "wrong issuer"
    assert _refused(verifier, jwt.encode(_claims(iss=None), SECRET, algorithm="HS256")) == "missing iss claim"


def test_without_a_configured_issuer_the_tokens_own_is_kept(config: JwtConfig) -> None:
    verifier = JwtVerifier(replace(config, issuer=None))
    assert verifier.verify(jwt.encode(_claims(iss="https://idp.two"), SECRET, algorithm="HS256")).issuer == (
        "https://idp.two"
    )
    assert verifier.verify(jwt.encode(_claims(iss=None), SECRET, algorithm="HS256")).issuer == ""
    # It names who owns the token's sessions, so it must be a string.
    numeric = _hand_made({"alg": "HS256", "typ": "JWT"}, _claims(iss=7), SECRET)
    assert _refused(verifier, numeric) == "invalid iss claim"


def test_wrong_audience(verifier: JwtVerifier) -> None:
    assert _refused(verifier, jwt.encode(_claims(aud="other"), SECRET, algorithm="HS256")) == "wrong audience"
    assert _refused(verifier, jwt.encode(_claims(aud=None), SECRET, algorithm="HS256")) == "missing aud claim"
    # A list that includes our audience is fine.
    assert verifier.verify(jwt.encode(_claims(aud=["x", AUDIENCE]), SECRET, algorithm="HS256")).tenant == "acme"


def test_token_for_an_audience_is_refused_when_none_is_configured(config: JwtConfig) -> None:
    verifier = JwtVerifier(replace(config, audience=None))
    assert _refused(verifier, jwt.encode(_claims(), SECRET, algorithm="HS256")) == "wrong audience"
    assert verifier.verify(jwt.encode(_claims(aud=None), SECRET, algorithm="HS256")).tenant == "acme"


# --- signatures, algorithms and keys ------------------------------------------------


def test_tampered_payload(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    for token in (
        jwt.encode(_claims(), SECRET, algorithm="HS256"),
        jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"}),
    ):
        header, _, signature = token.split(".")
        forged = _b64(json.dumps(_claims(tenant="victim")).encode())
        assert _refused(verifier, f"{header}.{forged}.{signature}") == "bad signature"


def test_signed_with_another_key(verifier: JwtVerifier) -> None:
    other_ec = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(_claims(), other_ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert _refused(verifier, token) == "bad signature"
    token = jwt.encode(_claims(), b"another-secret-another-secret-32", algorithm="HS256")
    assert _refused(verifier, token) == "bad signature"


def test_signed_with_another_rsa_key(verifier: JwtVerifier) -> None:
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), other_rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    assert _refused(verifier, token) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(verifier: JwtVerifier, alg: str) -> None:
    token = _hand_made({"alg": alg, "typ": "JWT"}, _claims(), key=None)
    assert token.endswith(".")
    assert _refused(verifier, token) == "algorithm not allowed"


def test_alg_none_is_refused_by_an_hmac_only_verifier() -> None:
    verifier = JwtVerifier(JwtConfig(secret=SECRET, algorithms=("HS256",)))
    assert _refused(verifier, _hand_made({"alg": "NoNe"}, _claims(aud=None, iss=None), key=None)) == (
        "algorithm not allowed"
    )


def test_algorithm_confusion_is_refused(config: JwtConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for kid in ("rsa-1", None):
        header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
        forged = _hand_made(header, _claims(), key=public_pem)
        # HS256 allowed: checked with the configured secret only, so it fails.
        assert _refused(JwtVerifier(config), forged) == "bad signature"
        # Only RS256 allowed: refused before any key is looked at.
        rs_only = JwtVerifier(replace(config, secret=None, algorithms=("RS256",)))
        assert _refused(rs_only, forged) == "algorithm not allowed"


def test_key_type_must_match_the_algorithm(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    # An RS256 token naming the EC key's kid cannot be checked with that key.
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert _refused(verifier, token) == "algorithm does not match key"


def test_jwk_alg_pins_the_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks = _write_jwks(tmp_path / "pinned.json", _jwk(rsa_key, "rsa-1") | {"alg": "PS256"})
    verifier = JwtVerifier(JwtConfig(jwks_file=jwks, algorithms=("RS256", "PS256")))
    claims = _claims(aud=None, iss=None)
    assert _refused(verifier, jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})) == (
        "algorithm does not match key"
    )
    assert verifier.verify(jwt.encode(claims, rsa_key, algorithm="PS256", headers={"kid": "rsa-1"})).tenant == "acme"


def test_unknown_kid(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-9"})
    assert _refused(verifier, token) == "unknown kid"
    # Several keys: a token must say which one.
    assert _refused(verifier, jwt.encode(_claims(), rsa_key, algorithm="RS256")) == "missing kid"


def test_single_key_jwks_needs_no_kid(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    jwks = _write_jwks(tmp_path / "one.json", _jwk(ec_key, None))
    verifier = JwtVerifier(JwtConfig(jwks_file=jwks, algorithms=("ES256",)))
    token = jwt.encode(_claims(aud=None, iss=None), ec_key, algorithm="ES256")
    assert verifier.verify(token).tenant == "acme"
    # A kid the set does not have is still unknown.
    token = jwt.encode(_claims(aud=None, iss=None), ec_key, algorithm="ES256", headers={"kid": "x"})
    assert _refused(verifier, token) == "unknown kid"


def test_algorithm_not_in_allowlist(config: JwtConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(config)
    token = jwt.encode(_claims(), rsa_key, algorithm="RS384", headers={"kid": "rsa-1"})
    assert _refused(verifier, token) == "algorithm not allowed"
    hs_only = JwtVerifier(replace(config, algorithms=("HS256",), jwks_file=None))
    token = jwt.encode(_claims(), SECRET * 2, algorithm="HS512")
    assert _refused(hs_only, token) == "algorithm not allowed"


# --- claims and shape ----------------------------------------------------------------


def test_missing_tenant_claim(verifier: JwtVerifier) -> None:
    assert _refused(verifier, jwt.encode(_claims(tenant=None), SECRET, algorithm="HS256")) == "missing tenant claim"
    assert _refused(verifier, jwt.encode(_claims(tenant=""), SECRET, algorithm="HS256")) == "missing tenant claim"


@pytest.mark.parametrize("tenant", ["Acme", "-acme", "a" * 64, "acme\n", "ac me", 7, ["acme"]])
def test_invalid_tenant_claim(verifier: JwtVerifier, tenant: Any) -> None:
    assert _refused(verifier, jwt.encode(_claims(tenant=tenant), SECRET, algorithm="HS256")) == "invalid tenant claim"


def test_missing_subject_claim(verifier: JwtVerifier) -> None:
    assert _refused(verifier, jwt.encode(_claims(sub=None), SECRET, algorithm="HS256")) == "missing subject claim"
    assert _refused(verifier, jwt.encode(_claims(sub=""), SECRET, algorithm="HS256")) == "missing subject claim"


def test_token_over_8_kib_is_refused(verifier: JwtVerifier) -> None:
    token = jwt.encode(_claims(pad="x" * MAX_TOKEN_LENGTH), SECRET, algorithm="HS256")
    assert len(token) > MAX_TOKEN_LENGTH
    assert _refused(verifier, token) == "token too large"
    assert _refused(verifier, "a" * (MAX_TOKEN_LENGTH + 1)) == "token too large"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "!!!.e30.", "e30.e30.", _b64(b"[1]") + ".e30.", "é.e30.", _b64(b'{"alg":5}') + ".e30."],
)
def test_malformed_tokens(verifier: JwtVerifier, token: str) -> None:
    assert _refused(verifier, token) == "malformed"


def test_malformed_payload_under_a_valid_signature(verifier: JwtVerifier) -> None:
    token = _hand_made({"alg": "HS256"}, _claims(exp="soon"), key=SECRET)
    assert _refused(verifier, token) == "malformed"


# --- configuration ---------------------------------------------------------------------


def _config_error(build: Callable[[], JwtConfig]) -> str:
    with pytest.raises(JwtConfigError) as caught:
        JwtVerifier(build())
    return str(caught.value)


def test_config_short_secret() -> None:
    assert _config_error(lambda: JwtConfig(secret=b"x" * 31, algorithms=("HS256",))).startswith("secret:")
    # HS512 needs a secret as long as its hash (RFC 7518 §3.2).
    assert "HS512" in _config_error(lambda: JwtConfig(secret=SECRET, algorithms=("HS256", "HS512")))


@pytest.mark.parametrize("none", ["none", "None", "NONE"])
def test_config_none_algorithm(none: str) -> None:
    assert _config_error(lambda: JwtConfig(secret=SECRET, algorithms=("HS256", none))).startswith("algorithms:")


def test_config_unsupported_or_empty_algorithms() -> None:
    assert "'HS1'" in _config_error(lambda: JwtConfig(secret=SECRET, algorithms=("HS1",)))
    assert _config_error(lambda: JwtConfig(secret=SECRET, algorithms=())).startswith("algorithms:")


def test_config_hmac_algorithm_without_secret(jwks_file: Path) -> None:
    assert _config_error(lambda: JwtConfig(jwks_file=jwks_file)).startswith("secret:")


def test_config_asymmetric_algorithm_without_jwks() -> None:
    # The default allowlist includes RS256/ES256, so a secret alone is not enough.
    assert _config_error(lambda: JwtConfig(secret=SECRET)).startswith("jwks_file:")


def test_config_needs_a_secret_or_jwks() -> None:
    assert "secret" in _config_error(lambda: JwtConfig(algorithms=("HS256",)))


def test_config_pem_as_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert _config_error(lambda: JwtConfig(secret=pem, algorithms=("HS256",))).startswith("secret:")


def test_config_bad_leeway() -> None:
    assert _config_error(lambda: JwtConfig(secret=SECRET, algorithms=("HS256",), leeway=-1)).startswith("leeway:")


def test_config_oct_key_in_jwks(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    oct_key = {"kty": "oct", "kid": "shared", "k": _b64(SECRET)}
    jwks = _write_jwks(tmp_path / "jwks.json", _jwk(rsa_key, "rsa-1"), oct_key)
    message = _config_error(lambda: JwtConfig(jwks_file=jwks, algorithms=("RS256",)))
    assert message.startswith("jwks_file:")
    assert "'shared'" in message
    assert "oct" in message


def test_config_private_key_in_jwks(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    private = json.loads(ECAlgorithm.to_jwk(ec_key)) | {"kid": "ec-1"}
    jwks = _write_jwks(tmp_path / "jwks.json", private)
    assert "private" in _config_error(lambda: JwtConfig(jwks_file=jwks, algorithms=("ES256",)))


@pytest.mark.parametrize(
    "content",
    [
        None,
        "not json",
        "[]",
        '{"keys": {}}',
        '{"foo": 1}',
        '{"keys": []}',
        '{"keys": [1]}',
        '{"keys": [{"kty": "RSA"}]}',
    ],
)
def test_config_bad_jwks_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    assert _config_error(lambda: JwtConfig(jwks_file=path, algorithms=("RS256",))).startswith("jwks_file:")


def test_config_jwks_kid_rules(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    duplicate = _write_jwks(tmp_path / "dup.json", _jwk(rsa_key, "k"), _jwk(ec_key, "k"))
    assert "'k'" in _config_error(lambda: JwtConfig(jwks_file=duplicate, algorithms=("RS256",)))
    kidless = _write_jwks(tmp_path / "kidless.json", _jwk(rsa_key, "k"), _jwk(ec_key, None))
    assert "kid" in _config_error(lambda: JwtConfig(jwks_file=kidless, algorithms=("RS256",)))


def test_jwks_skips_encryption_and_unknown_keys(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    okp = {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": _b64(b"\0" * 32)}
    enc = _jwk(ec_key, "enc-1") | {"use": "enc"}
    jwks = _write_jwks(tmp_path / "mixed.json", okp, enc, _jwk(ec_key, "ec-1"))
    verifier = JwtVerifier(JwtConfig(jwks_file=jwks, algorithms=("ES256",)))
    claims = _claims(aud=None, iss=None)
    assert verifier.verify(jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec-1"})).tenant == "acme"
    token = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "enc-1"})
    assert _refused(verifier, token) == "unknown kid"


# --- key rotation --------------------------------------------------------------------


def test_reload_picks_up_a_rotated_jwks(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    path = _write_jwks(tmp_path / "jwks.json", _jwk(ec_key, "ec-1"))
    verifier = JwtVerifier(JwtConfig(jwks_file=path, algorithms=("RS256", "ES256")))
    claims = _claims(aud=None, iss=None)
    old_token = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    new_token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa-2"})
    assert verifier.verify(old_token).tenant == "acme"
    assert _refused(verifier, new_token) == "unknown kid"

    _write_jwks(path, _jwk(rsa_key, "rsa-2"))
    verifier.reload()
    assert verifier.verify(new_token).tenant == "acme"
    assert _refused(verifier, old_token) == "unknown kid"

    # A broken file is reported, and the keys loaded before stay in use.
    path.write_text("{")
    with pytest.raises(JwtConfigError):
        verifier.reload()
    assert verifier.verify(new_token).tenant == "acme"
