"""The authenticated caller."""

from __future__ import annotations

import re
from dataclasses import dataclass

ADMIN = "admin"
USER = "user"
ROLES = frozenset({ADMIN, USER})
# Metadata (an HTTP header through Envoy) with which an admin acts for
# another tenant: every RPC then sees that tenant, as if its own.
ACT_AS_HEADER = "x-flowport-act-as-tenant"
# The tenant whose admins operate the whole gateway (the tenant of the admin key made at first
# start): they act for any tenant, manage every tenant's keys and read every tenant's audit log,
# figures and metrics. An admin of any other tenant administers that tenant alone, so a
# customer's admin key is never a key to the other customers.
OPERATOR_TENANT = "default"
# What a call reaching another tenant needs, as refusals say it (with `role` and `tenant` metadata).
NEEDS_OPERATOR = f"the admin role in tenant {OPERATOR_TENANT!r} (the gateway operator's)"


def operator_metadata() -> dict[str, str]:
    """The ErrorInfo metadata of a refusal that needs an admin of OPERATOR_TENANT."""
    return {"role": ADMIN, "tenant": OPERATOR_TENANT}


TENANT_NAME = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")


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
    # A JWT's `iss` (empty when it has none); with `subject`, who the token speaks for.
    issuer: str = ""
    # For an admin acting for another tenant (ACT_AS_HEADER): its own tenant,
    # while `tenant` is the one it acts for. Empty otherwise.
    acting_from: str = ""
    # Unix time at which the credential stops being accepted (a JWT's exp
    # plus leeway, an API key's expire_time); None when it does not expire.
    # Open streams end then.
    expires_at: float | None = None

    @property
    def home_tenant(self) -> str:
        """The tenant the credential belongs to."""
        return self.acting_from or self.tenant

    @property
    def is_admin(self) -> bool:
        """Admins manage their tenant: its keys, its audit log, every session in it."""
        return ADMIN in self.roles

    @property
    def is_operator(self) -> bool:
        """An admin of OPERATOR_TENANT: also acts for every other tenant, and sees the gateway's
        figures and every tenant's keys and audit entries."""
        return ADMIN in self.roles and self.home_tenant == OPERATOR_TENANT


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
