"""PermissionCheckNode: the seed's `tenant_id:resource_id:permission` check, as a node.

It answers with the gateway's own permission model (server/auth/permissions.py),
so a workflow that gates a step on it agrees with what the API would allow.
It decides; it grants nothing: the subject's roles come from the workflow
(its config, or a connection from a session's metadata, say), never from the
caller's credential nor its execution inputs, and the node reaches no
resource itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flowport.server.auth.permissions import RESOURCE_PERMISSIONS, resource_allowed
from flowport.server.auth.principal import ROLES, USER
from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError, NodeType

FORMAT = "tenant_id:resource_id:permission"


class PermissionCheckNode(NodeType):
    """Whether a subject may act on a resource, by the gateway's role model."""

    type_name = "PermissionCheckNode"
    description = (
        f"Checks `permission` ('{FORMAT}', e.g. 'acme:orders/42:read') for a subject with `roles` "
        "(default ['user']) of the execution's tenant: admins may do anything in their own (in every tenant "
        "when it is 'default', the operator's), users anything but 'admin' in their own. Outputs `allowed` and "
        "`reason`; connect `allowed` to a SwitchNode to gate a step."
    )
    category = "security"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {
            "permission_format": {"enum": [FORMAT], "default": FORMAT},
            "enforce_tenant_scope": {
                "type": "boolean",
                "default": True,
                "description": "compare the permission's tenant with the execution's; off only for one-tenant use",
            },
            "permission": {"type": "string", "description": "the permission to check, when not connected"},
            "roles": {"type": "array", "items": {"enum": sorted(ROLES)}},
        },
        "additionalProperties": False,
    }
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["permission"],
        "properties": {
            "permission": {"type": "string", "description": FORMAT},
            "roles": {"type": "array", "items": {"type": "string"}, "description": "the subject's roles"},
        },
    }
    outputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {
            "allowed": {"type": "boolean"},
            "reason": {"type": "string"},
            "tenant_id": {"type": "string"},
            "resource_id": {"type": "string"},
            "permission": {"type": "string"},
        },
    }
    retry_safe = True
    default_timeout = 5.0
    # The workflow says whose roles are checked and how (its config, or a connection from, say, a
    # session's metadata): a caller's inputs must not make the check pass.
    fixed_params = frozenset({"roles", "enforce_tenant_scope", "permission_format"})

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        raw = params.get("permission")
        if not isinstance(raw, str):
            raise NodeError(f"permission must be a '{FORMAT}' string", reason="MISSING_INPUT")
        parts = raw.split(":")
        # The resource id may itself hold colons: the tenant is first, the permission last.
        if len(parts) < 3 or not all(parts):
            raise NodeError(f"permission {raw[:200]!r} is not '{FORMAT}'", reason="BAD_INPUT")
        tenant_id, resource_id, permission = parts[0], ":".join(parts[1:-1]), parts[-1]
        if permission not in RESOURCE_PERMISSIONS:
            known = ", ".join(sorted(RESOURCE_PERMISSIONS))
            raise NodeError(f"unknown permission {permission[:50]!r}; known: {known}", reason="BAD_INPUT")
        roles = _roles(params.get("roles", [USER]))
        scoped = params.get("enforce_tenant_scope", True)
        allowed, why = resource_allowed(ctx.tenant, roles, tenant_id if scoped else ctx.tenant, permission)
        return {
            "allowed": allowed,
            "reason": why,
            "tenant_id": tenant_id,
            "resource_id": resource_id,
            "permission": permission,
        }


def _roles(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise NodeError("roles must be a list of role names", reason="BAD_INPUT")
    unknown = sorted(set(value) - ROLES)
    if unknown:
        raise NodeError(f"unknown roles {unknown}; known: {sorted(ROLES)}", reason="BAD_INPUT")
    return frozenset(value)
