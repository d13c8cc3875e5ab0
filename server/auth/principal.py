"""The authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass

ADMIN = "admin"
USER = "user"
ROLES = frozenset({ADMIN, USER})


@dataclass(frozen=True)
class Principal:
    """Who a call acts for: a tenant, a subject in it, and the subject's roles."""

    tenant: str
    subject: str
    roles: frozenset[str]
    # How the caller proved it: "api_key", "jwt" or "insecure" (auth turned off).
    method: str
    # The API key's public id, or the JWT's `jti`, for audit; empty otherwise.
    credential_id: str = ""

    @property
    def is_admin(self) -> bool:
        """Admins manage keys and tenants and may act on every tenant."""
        return ADMIN in self.roles


class AuthenticationFailed(Exception):
    """A credential was missing or did not verify.

    `reason` is for the audit log and server logs only; callers always get
    the same UNAUTHENTICATED answer, which tells an attacker nothing. It
    never holds credential material. `credential_id` is the public id of a
    credential the server knows (a revoked or expired key), else empty.
    """

    def __init__(self, reason: str, *, credential_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.credential_id = credential_id
