"""Every RPC of the API declares who may call it, in one table.

Read from the descriptor set Envoy serves, so an RPC added to a .proto
without a permission fails here (and is refused at run time: the
interceptor denies an undeclared method rather than guess)."""

from __future__ import annotations

from google.protobuf import descriptor_pb2

from flowport.server.auth.permissions import PERMISSIONS, Access, access_for, allowed
from flowport.server.auth.principal import ADMIN, USER, Principal
from flowport.transcoder.http_rules import descriptor_path


def _api_methods() -> set[str]:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path().read_bytes())
    return {
        f"/{f.package}.{service.name}/{method.name}"
        for f in descriptor_set.file
        if f.package == "flowport.v1"
        for service in f.service
        for method in service.method
    }


def test_every_rpc_declares_its_permission() -> None:
    methods = _api_methods()
    assert len(methods) > 20
    undeclared = sorted(m for m in methods if access_for(m) is None)
    assert not undeclared, f"RPCs without a permission in server/auth/permissions.py: {undeclared}"


def test_every_declared_permission_names_a_real_rpc() -> None:
    stale = sorted(set(PERMISSIONS) - _api_methods())
    assert not stale, f"permissions for RPCs that do not exist: {stale}"


def test_only_health_and_info_are_public_in_the_api() -> None:
    # GetInfo (GET /) names the gateway and its routes, nothing of a tenant's, as Kailash's `/` does;
    # the enterprise features and health are the same facts under Kailash's enterprise paths.
    public = sorted(m for m, access in PERMISSIONS.items() if access is Access.PUBLIC)
    assert public == [
        "/flowport.v1.GatewayService/GetEnterpriseFeatures",
        "/flowport.v1.GatewayService/GetEnterpriseHealth",
        "/flowport.v1.GatewayService/GetHealth",
        "/flowport.v1.GatewayService/GetInfo",
    ]


def test_undeclared_methods_are_not_public() -> None:
    assert access_for("/flowport.v1.NewService/Anything") is None
    assert access_for("/grpc.health.v1.Health/Check") is Access.PUBLIC


def test_roles_against_access() -> None:
    user = Principal("acme", "ada", frozenset({USER}), "key")
    admin = Principal("default", "root", frozenset({ADMIN, USER}), "key")
    nobody = Principal("acme", "x", frozenset(), "key")
    assert allowed(user, Access.USER) and not allowed(user, Access.ADMIN)
    assert allowed(admin, Access.ADMIN) and allowed(admin, Access.USER)
    assert not allowed(nobody, Access.USER) and allowed(nobody, Access.PUBLIC)
