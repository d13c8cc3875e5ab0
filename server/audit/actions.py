"""The audit log's actions: dotted names, like event types.

A new kind of entry gets a name here, so `ListAuditEvents` can check an
`action` filter against the full list.
"""

from __future__ import annotations

AUTH_FAILED = "auth.failed"
"""A call whose credential was missing or did not verify."""
ACCESS_DENIED = "access.denied"
"""An authenticated caller without the role an RPC needs (PERMISSION_DENIED)."""
ACCESS_CROSS_TENANT = "access.cross_tenant"
"""A non-admin named another tenant in a request; the server acted in the
caller's own tenant or refused, and the other tenant saw nothing."""
ADMIN_CALL = "admin.call"
"""An admin's call that changes something or names another tenant."""
API_KEY_CREATED = "api_key.created"
API_KEY_REVOKED = "api_key.revoked"
# Names of actions about secrets, not secrets (hence the noqa).
SECRET_WRITTEN = "secret.written"  # noqa: S105
"""A secret was created or replaced (its value is never recorded)."""
SECRET_DELETED = "secret.deleted"  # noqa: S105
SECRET_KEY_ROTATED = "secret.key_rotated"  # noqa: S105
"""Every secret was re-encrypted under a new key."""

ALL = frozenset(
    {
        AUTH_FAILED,
        ACCESS_DENIED,
        ACCESS_CROSS_TENANT,
        ADMIN_CALL,
        API_KEY_CREATED,
        API_KEY_REVOKED,
        SECRET_WRITTEN,
        SECRET_DELETED,
        SECRET_KEY_ROTATED,
    }
)
FAMILIES = frozenset(name.split(".", 1)[0] for name in ALL)


def is_known(action: str) -> bool:
    """Whether `action` names an action, or a family as "family.*"."""
    if action.endswith(".*"):
        return action[:-2] in FAMILIES
    return action in ALL
