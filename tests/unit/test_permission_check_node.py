"""PermissionCheckNode answers the seed's `tenant_id:resource_id:permission`
checks with the gateway's own role model."""

from __future__ import annotations

from typing import Any

import pytest

from flowport.server.auth.permissions import resource_allowed
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.permission_check import PermissionCheckNode


def _ctx(tenant: str = "acme") -> NodeContext:
    return NodeContext(
        tenant=tenant, execution_id="exe_1", node_id="check", attempt=1, timeout=5.0, services=NodeServices()
    )


async def _check(**params: Any) -> dict[str, Any]:
    return await PermissionCheckNode().run(_ctx(), None, params)


@pytest.mark.parametrize(
    ("permission", "roles", "allowed"),
    [
        ("acme:orders/42:read", ["user"], True),
        ("acme:orders/42:delete", ["user"], True),
        ("acme:orders/42:admin", ["user"], False),  # needs the admin role
        ("globex:orders/42:read", ["user"], False),  # another tenant
        ("acme:orders/42:admin", ["admin"], True),  # admins: their own tenant
        ("globex:orders/42:read", ["admin"], False),  # not another
        ("acme:orders/42:read", ["admin"], True),  # the admin role alone is enough
        ("acme:orders/42:read", [], False),  # no role
    ],
)
async def test_the_role_model_decides(permission: str, roles: list[str], allowed: bool) -> None:
    out = await _check(permission=permission, roles=roles)
    assert out["allowed"] is allowed, out["reason"]
    assert (out["tenant_id"], out["resource_id"]) == (permission.split(":", maxsplit=1)[0], "orders/42")


async def test_the_operators_admins_reach_every_tenant() -> None:
    out = await PermissionCheckNode().run(
        _ctx("default"), None, {"permission": "globex:orders/42:admin", "roles": ["admin"]}
    )
    assert out["allowed"] is True, out["reason"]


async def test_defaults_to_the_user_role_and_keeps_colons_in_resource_ids() -> None:
    out = await _check(permission="acme:urn:doc:7:write")
    assert (out["allowed"], out["resource_id"], out["permission"]) == (True, "urn:doc:7", "write")


async def test_tenant_scope_can_be_turned_off_for_one_tenant_deployments() -> None:
    assert (await _check(permission="other:r:read", enforce_tenant_scope=False))["allowed"] is True
    # Roles still count.
    assert (await _check(permission="other:r:admin", enforce_tenant_scope=False))["allowed"] is False


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "must be a 'tenant_id:resource_id:permission' string"),
        ({"permission": "acme:read"}, "is not 'tenant_id:resource_id:permission'"),
        ({"permission": "acme::read"}, "is not 'tenant_id:resource_id:permission'"),
        ({"permission": "acme:r:fly"}, "unknown permission 'fly'"),
        ({"permission": "acme:r:read", "roles": "admin"}, "roles must be a list"),
        ({"permission": "acme:r:read", "roles": ["root"]}, "unknown roles ['root']"),
    ],
)
async def test_bad_input_fails_the_node_saying_what(params: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        await _check(**params)


def test_config_is_validated_with_a_path() -> None:
    problems = PermissionCheckNode.validate_config({"permission_format": "user:perm"}, "nodes[0].config")
    assert [path for path, _ in problems] == ["nodes[0].config.permission_format"]
    assert (
        PermissionCheckNode.validate_config(
            {"permission_format": "tenant_id:resource_id:permission", "enforce_tenant_scope": True}, "nodes[0].config"
        )
        == []
    )


def test_resource_allowed_answers_with_a_reason() -> None:
    assert resource_allowed("acme", frozenset({"user"}), "acme", "execute") == (
        True,
        "users may act on their own tenant's resources",
    )
    assert resource_allowed("acme", frozenset({"user"}), "globex", "read")[0] is False
