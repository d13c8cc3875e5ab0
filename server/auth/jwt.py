"""JWT bearer tokens: verify a token and turn its claims into a `Principal`.

The token's header is attacker-controlled, so it only ever *selects* among
keys the operator configured; it never widens what is accepted:

* `alg` must be on the configured allowlist, and `none` is never allowed.
* An HMAC `alg` (HS*) is checked with the configured shared secret only; an
  asymmetric `alg` (RS*, PS*, ES*) only with a JWKS key of the matching type.
  A public key is therefore never used as an HMAC secret (the classic
  "algorithm confusion" forgery).
* PyJWT is given exactly the one algorithm that fits the chosen key.
* Header members that point elsewhere for keys (`jku`, `x5u`, `jwk`, `x5c`)
  are ignored: keys come from the local JWKS file and nowhere else.

JWKS file rules: symmetric (`oct`) keys and keys carrying private material
are refused outright, since either means a secret sits in a file meant to be
public. Keys whose `use` is not `sig`, and key types this module does not
verify with (e.g. `OKP`), are skipped, so an identity provider's mixed JWKS
can be used as published. With more than one usable key every key needs a
distinct `kid`, because tokens pick their key by `kid`.

Failures raise `AuthenticationFailed` with a short reason for logs and audit;
callers only ever see UNAUTHENTICATED.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm
from jwt.types import Options

from flowport.server.auth.principal import ROLES, USER, AuthenticationFailed, Principal

# Bearer tokens ride in headers; anything this big is not a token we issued
# and is refused before any base64/JSON work is spent on it.
MAX_TOKEN_LENGTH = 8 * 1024

# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
# 32 bytes is the floor for every HS* algorithm.
MIN_SECRET_LENGTH = 32
_HMAC_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# ECDSA algorithms are bound to one curve each (RFC 7518 §3.4); the names are
# cryptography's curve names.
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
SUPPORTED_ALGORITHMS = frozenset(_HMAC_MIN_SECRET) | _RSA_ALGORITHMS | frozenset(_EC_CURVES)

# NIST SP 800-131A: RSA below 2048 bits is no longer acceptable for signatures.
_MIN_RSA_BITS = 2048
# A JWKS is a handful of keys; a larger file is a wrong path, not a key set.
_MAX_JWKS_BYTES = 1024 * 1024

_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ROLE_SEPARATORS = re.compile(r"[\s,]+")

_PublicKey = RSAPublicKey | EllipticCurvePublicKey


@dataclass(frozen=True)
class JwtConfig:
    """How bearer tokens are verified; `JwtVerifier` checks it on construction."""

    # Shared secret for HS256/384/512; at least 32 bytes (more for HS384/512).
    secret: bytes | None = None
    # Public keys for RS*/PS*/ES*, a JWKS JSON file {"keys": [...]}.
    jwks_file: Path | None = None
    # When set, tokens must carry exactly this `iss` / include this `aud`.
    issuer: str | None = None
    audience: str | None = None
    # The allowlist; a token whose header names another algorithm is refused.
    algorithms: tuple[str, ...] = ("HS256", "RS256", "ES256")
    # Clock skew tolerated for exp/nbf/iat, seconds.
    leeway: float = 30.0
    tenant_claim: str = "tenant"
    subject_claim: str = "sub"
    # A list of strings, or one space/comma separated string.
    roles_claim: str = "roles"
    require_exp: bool = True


class JwtConfigError(ValueError):
    """The JWT configuration is unusable; the message names the setting."""


@dataclass(frozen=True)
class _Jwk:
    """One usable verification key from the JWKS."""

    kid: str | None
    # "RSA" or "EC": which algorithm family the key may verify.
    kty: str
    # The JWK's own `alg`, when it pins the key to one algorithm.
    alg: str | None
    key: _PublicKey


@dataclass(frozen=True)
class _KeySet:
    by_kid: Mapping[str, _Jwk]
    # The key a token without `kid` uses: set only when the JWKS holds exactly one.
    sole: _Jwk | None


class JwtVerifier:
    """Verifies bearer tokens against one `JwtConfig`; safe to share between tasks."""

    def __init__(self, config: JwtConfig) -> None:
        _check_config(config)
        self._config = config
        self._allowed = frozenset(config.algorithms)
        self._keys = _KeySet(by_kid={}, sole=None)
        if config.jwks_file is not None:
            self._keys = _load_jwks(config.jwks_file)
        # Claims PyJWT must find before it validates them; `iss` and `aud`
        # are required by PyJWT itself whenever an issuer/audience is given.
        self._options: Options = {
            "verify_signature": True,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            "verify_iss": True,
            "verify_aud": True,
            "require": ["exp"] if config.require_exp else [],
            # Config checks already refuse weak keys; this turns PyJWT's
            # warning into a refusal should one slip through anyway.
            "enforce_minimum_key_length": True,
        }

    @property
    def config(self) -> JwtConfig:
        return self._config

    def reload(self) -> None:
        """Re-read the JWKS file, e.g. after the identity provider rotated keys.

        A file that fails to load raises `JwtConfigError` and the keys loaded
        before stay in use, so a half-written rotation does not lock everyone out.
        """
        if self._config.jwks_file is not None:
            # One attribute swap: concurrent `verify` calls see the old set or the new.
            self._keys = _load_jwks(self._config.jwks_file)

    def verify(self, token: str) -> Principal:
        """The principal a valid token names; `AuthenticationFailed` otherwise."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthenticationFailed("token too large")
        if not token.isascii():
            raise AuthenticationFailed("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthenticationFailed("malformed")
        if alg.lower() == "none" or alg not in self._allowed:
            raise AuthenticationFailed("algorithm not allowed")
        key = self._key_for(alg, header)
        config = self._config
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,
                issuer=config.issuer,
                audience=config.audience,
                leeway=config.leeway,
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed(_reason(exc)) from None
        kinds = (claims.get(name) for name in ("type", "token_type", "typ", "token_use"))
        if any(isinstance(kind, str) and kind.lower() == "refresh" for kind in kinds):
            # Issuers that share one key for both (Kailash's gateway does) mark refresh
            # tokens so: those buy new access tokens from their issuer and are no credential here.
            raise AuthenticationFailed("refresh token")
        return self._principal(claims)

    def _key_for(self, alg: str, header: Mapping[str, Any]) -> bytes | _PublicKey:
        if alg in _HMAC_MIN_SECRET:
            # The config check guarantees a secret whenever an HS* alg is allowed.
            assert self._config.secret is not None
            return self._config.secret
        kid = header.get("kid")
        keys = self._keys
        if kid is None:
            if keys.sole is None:
                raise AuthenticationFailed("missing kid" if keys.by_kid else "unknown kid")
            jwk = keys.sole
        elif not isinstance(kid, str) or kid not in keys.by_kid:
            raise AuthenticationFailed("unknown kid")
        else:
            jwk = keys.by_kid[kid]
        if not _key_fits(jwk, alg):
            raise AuthenticationFailed("algorithm does not match key")
        return jwk.key

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        config = self._config
        tenant = claims.get(config.tenant_claim)
        if tenant is None or tenant == "":
            raise AuthenticationFailed("missing tenant claim")
        if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
            raise AuthenticationFailed("invalid tenant claim")
        subject = claims.get(config.subject_claim)
        if subject is None or subject == "":
            raise AuthenticationFailed("missing subject claim")
        if not isinstance(subject, str):
            raise AuthenticationFailed("invalid subject claim")
        jti = claims.get("jti", "")
        if not isinstance(jti, str):
            raise AuthenticationFailed("invalid jti claim")
        # With the subject it names who owns what the token creates (sessions).
        issuer = claims.get("iss", "")
        if not isinstance(issuer, str):
            raise AuthenticationFailed("invalid iss claim")
        # PyJWT checked that a present `exp` is a number; streams end once it passes.
        exp = claims.get("exp")
        return Principal(
            tenant=tenant,
            subject=subject,
            roles=_roles(claims, config.roles_claim),
            method="jwt",
            credential_id=jti,
            issuer=issuer,
            expires_at=None if exp is None else float(exp) + config.leeway,
        )


def _roles(claims: Mapping[str, Any], name: str) -> frozenset[str]:
    if name not in claims:
        return frozenset({USER})
    value = claims[name]
    if isinstance(value, str):
        names = [part for part in _ROLE_SEPARATORS.split(value) if part]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        names = value
    else:
        # A present but unreadable claim is refused rather than read as "no
        # claim", which would hand out the default role.
        raise AuthenticationFailed("invalid roles claim")
    # Unknown names (another system's roles, typos) grant nothing. A claim
    # naming only unknown roles leaves the principal with no roles at all.
    return frozenset(names) & ROLES


def _key_fits(jwk: _Jwk, alg: str) -> bool:
    """Whether `alg` may be verified with this key (family, curve, JWK `alg` pin)."""
    if jwk.alg is not None and jwk.alg != alg:
        return False
    if alg in _RSA_ALGORITHMS:
        return isinstance(jwk.key, RSAPublicKey)
    curve = _EC_CURVES.get(alg)
    return curve is not None and isinstance(jwk.key, EllipticCurvePublicKey) and jwk.key.curve.name == curve


def _reason(exc: jwt.PyJWTError) -> str:
    """A short, stable reason for a PyJWT failure (subclasses before their bases)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "not yet valid"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing {exc.claim} claim"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidKeyError):
        return "algorithm does not match key"
    return "malformed"


def _check_config(config: JwtConfig) -> None:
    algorithms = config.algorithms
    if isinstance(algorithms, str) or not algorithms:
        raise JwtConfigError("algorithms: give at least one algorithm, as a list")
    for alg in algorithms:
        if alg.lower() == "none":
            raise JwtConfigError("algorithms: 'none' (unsigned tokens) is never allowed")
        if alg not in SUPPORTED_ALGORITHMS:
            supported = ", ".join(sorted(SUPPORTED_ALGORITHMS))
            raise JwtConfigError(f"algorithms: {alg!r} is not supported (use {supported})")
    if not math.isfinite(config.leeway) or config.leeway < 0:
        raise JwtConfigError("leeway: must be a non-negative number of seconds")
    for field in ("tenant_claim", "subject_claim", "roles_claim"):
        if not getattr(config, field):
            raise JwtConfigError(f"{field}: must name a claim")
    if config.secret is None and config.jwks_file is None:
        raise JwtConfigError("secret / jwks_file: set a shared secret, a JWKS file, or both")

    hmac_algs = [alg for alg in algorithms if alg in _HMAC_MIN_SECRET]
    asymmetric_algs = [alg for alg in algorithms if alg not in _HMAC_MIN_SECRET]
    if config.secret is not None:
        _check_secret(config.secret, hmac_algs)
    elif hmac_algs:
        raise JwtConfigError(f"secret: required because algorithms allows {', '.join(hmac_algs)}")
    if asymmetric_algs and config.jwks_file is None:
        raise JwtConfigError(f"jwks_file: required because algorithms allows {', '.join(asymmetric_algs)}")


def _check_secret(secret: bytes, hmac_algs: list[str]) -> None:
    if not isinstance(secret, bytes):
        raise JwtConfigError("secret: must be bytes")
    needed = max([MIN_SECRET_LENGTH, *(_HMAC_MIN_SECRET[alg] for alg in hmac_algs)])
    if len(secret) < needed:
        raise JwtConfigError(
            f"secret: is {len(secret)} bytes; at least {needed} are needed"
            + (f" for {', '.join(hmac_algs)}" if needed > MIN_SECRET_LENGTH else "")
        )
    try:
        # PyJWT refuses PEM/DER/SSH keys as HMAC secrets at verify time; say so now.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        raise JwtConfigError("secret: looks like a public/private key, not a shared secret") from None


def _load_jwks(path: Path) -> _KeySet:
    try:
        with path.open("rb") as file:
            raw = file.read(_MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise JwtConfigError(f"jwks_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_JWKS_BYTES:
        raise JwtConfigError(f"jwks_file: {path} is larger than {_MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise JwtConfigError(f"jwks_file: {path} is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwtConfigError(f'jwks_file: {path} is not a JWKS (expected {{"keys": [...]}})')

    keys: list[_Jwk] = []
    for index, entry in enumerate(document["keys"]):
        key = _load_jwk(path, index, entry)
        if key is not None:
            keys.append(key)
    if not keys:
        raise JwtConfigError(f"jwks_file: {path} holds no RSA or EC signing key")

    by_kid: dict[str, _Jwk] = {}
    for key in keys:
        if key.kid is None:
            if len(keys) > 1:
                raise JwtConfigError(f"jwks_file: {path} holds several keys, so every key needs a 'kid'")
            continue
        if key.kid in by_kid:
            raise JwtConfigError(f"jwks_file: {path} has two keys with kid {key.kid!r}")
        by_kid[key.kid] = key
    return _KeySet(by_kid=by_kid, sole=keys[0] if len(keys) == 1 else None)


def _load_jwk(path: Path, index: int, entry: object) -> _Jwk | None:
    """One JWKS entry as a key; None when it is not a key this module verifies with."""
    where = f"jwks_file: {path} key #{index}"
    if not isinstance(entry, dict):
        raise JwtConfigError(f"{where} is not a JSON object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtConfigError(f"{where}: 'kid' must be a string")
    if kid is not None:
        where = f"jwks_file: {path} key {kid!r}"
    kty = entry.get("kty")
    alg = entry.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise JwtConfigError(f"{where}: 'alg' must be a string")
    if kty == "oct":
        # A symmetric key here is a shared secret in a public-key file: refuse
        # it rather than risk it ever being used to check an HS* signature.
        raise JwtConfigError(f"{where} is a symmetric ('oct') key; use the secret setting for HMAC")
    if "d" in entry:
        raise JwtConfigError(f"{where} contains private key material; publish only the public key")
    if entry.get("use", "sig") != "sig" or kty not in ("RSA", "EC"):
        return None
    try:
        loaded: object = RSAAlgorithm.from_jwk(entry) if kty == "RSA" else ECAlgorithm.from_jwk(entry)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise JwtConfigError(f"{where} is not a valid {kty} public key: {exc}") from None
    if isinstance(loaded, RSAPublicKey):
        if loaded.key_size < _MIN_RSA_BITS:
            raise JwtConfigError(f"{where} is a {loaded.key_size}-bit RSA key; at least {_MIN_RSA_BITS} bits needed")
        return _Jwk(kid=kid, kty=kty, alg=alg, key=loaded)
    if isinstance(loaded, EllipticCurvePublicKey):
        return _Jwk(kid=kid, kty=kty, alg=alg, key=loaded)
    raise JwtConfigError(f"{where} is not a public key")
