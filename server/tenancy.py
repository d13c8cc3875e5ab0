"""Which tenant a call acts for: its authenticated principal's."""

from __future__ import annotations

from flowport.server.auth.context import CURRENT
from flowport.server.auth.principal import OPERATOR_TENANT, Principal
from flowport.server.types import Context

# A call with no principal (public RPCs) and the first-start admin key belong to it.
DEFAULT_TENANT = OPERATOR_TENANT


def principal_of(context: Context) -> Principal | None:
    """The caller, as authenticated by the interceptor (None for public calls)."""
    return CURRENT.get()


def tenant_of(context: Context) -> str:
    """The tenant the call acts for."""
    principal = CURRENT.get()
    # Only public RPCs (health) and in-process tests without the
    # authenticating interceptor have no principal.
    return DEFAULT_TENANT if principal is None else principal.tenant


def administered_tenant() -> str | None:
    """The tenant whose keys, audit entries and figures the caller reaches: its own for an admin of
    a tenant (and for its users' figures); None, every tenant's, for the operator's admins (those of
    OPERATOR_TENANT) and with authentication off."""
    principal = CURRENT.get()
    return None if principal is None or principal.is_operator else principal.tenant
