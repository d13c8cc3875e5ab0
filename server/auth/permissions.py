"""Who may call what: one declaration per RPC, checked in one place.

`PUBLIC` needs no credential (health checks and reflection, which only
describes the API that /openapi.json publishes anyway); `USER` needs a
valid credential for the tenant; `ADMIN` needs the admin role (what the
call reaches is the admin's own tenant, unless it is the operator's:
principal.OPERATOR_TENANT); `OPERATOR` needs an admin of the operator's
tenant. A test fails when an RPC of the API has no entry here.
"""

from __future__ import annotations

from enum import Enum

from flowport.server.auth.principal import ADMIN, OPERATOR_TENANT, USER, Principal
from flowport.server.errors import shown


class Access(Enum):
    """What a caller needs to make a call."""

    PUBLIC = "public"
    USER = USER
    ADMIN = ADMIN
    OPERATOR = "operator"


_API = "/flowport.v1."
PERMISSIONS: dict[str, Access] = {
    f"{_API}GatewayService/GetInfo": Access.PUBLIC,
    f"{_API}GatewayService/GetHealth": Access.PUBLIC,
    # A tenant's own figures; the operator's admins get every tenant's and the process's.
    f"{_API}GatewayService/GetStats": Access.USER,
    # Kailash's enterprise routes: the public ones say what GetInfo and GetHealth say; the
    # others count or list the caller's tenant, or point at where its figures are.
    f"{_API}GatewayService/GetEnterpriseFeatures": Access.PUBLIC,
    f"{_API}GatewayService/GetEnterpriseHealth": Access.PUBLIC,
    f"{_API}GatewayService/GetDurabilityStatus": Access.USER,
    f"{_API}GatewayService/GetDurableRequests": Access.USER,
    f"{_API}GatewayService/GetDashboard": Access.USER,
    f"{_API}SessionService/CreateSession": Access.USER,
    f"{_API}SessionService/GetSession": Access.USER,
    f"{_API}SessionService/ListSessions": Access.USER,
    f"{_API}SessionService/DeleteSession": Access.USER,
    f"{_API}WorkflowService/CreateWorkflow": Access.USER,
    f"{_API}WorkflowService/GetWorkflow": Access.USER,
    f"{_API}WorkflowService/ListWorkflows": Access.USER,
    f"{_API}WorkflowService/GetWorkflowMap": Access.USER,
    f"{_API}WorkflowService/DeleteWorkflow": Access.USER,
    f"{_API}WorkflowService/ValidateWorkflow": Access.USER,
    f"{_API}ExecutionService/CreateExecution": Access.USER,
    f"{_API}ExecutionService/GetExecution": Access.USER,
    f"{_API}ExecutionService/ListExecutions": Access.USER,
    f"{_API}ExecutionService/CancelExecution": Access.USER,
    f"{_API}ExecutionService/WatchExecution": Access.USER,
    f"{_API}EventService/StreamEvents": Access.USER,
    f"{_API}EventService/ListRecentEvents": Access.USER,
    f"{_API}WebhookService/CreateWebhook": Access.USER,
    f"{_API}WebhookService/GetWebhook": Access.USER,
    f"{_API}WebhookService/ListWebhooks": Access.USER,
    f"{_API}WebhookService/DeleteWebhook": Access.USER,
    f"{_API}WebhookService/ListWebhookDeliveries": Access.USER,
    f"{_API}WebhookService/RedeliverWebhookDelivery": Access.USER,
    f"{_API}SchemaService/ListNodeSchemas": Access.USER,
    f"{_API}SchemaService/GetNodeSchema": Access.USER,
    f"{_API}SchemaService/GetWorkflowSchema": Access.USER,
    # Every tenant's series: the operator's alone.
    f"{_API}GatewayService/GetMetrics": Access.OPERATOR,
    f"{_API}ApiKeyService/CreateApiKey": Access.ADMIN,
    f"{_API}ApiKeyService/GetApiKey": Access.ADMIN,
    f"{_API}ApiKeyService/ListApiKeys": Access.ADMIN,
    f"{_API}ApiKeyService/RevokeApiKey": Access.ADMIN,
    # The caller's own tenant's secrets; values never leave through any RPC.
    f"{_API}SecretService/PutSecret": Access.USER,
    f"{_API}SecretService/GetSecret": Access.USER,
    f"{_API}SecretService/ListSecrets": Access.USER,
    f"{_API}SecretService/DeleteSecret": Access.USER,
    f"{_API}ServiceRegistryService/RegisterService": Access.USER,
    f"{_API}ServiceRegistryService/GetService": Access.USER,
    f"{_API}ServiceRegistryService/ListServices": Access.USER,
    f"{_API}ServiceRegistryService/Heartbeat": Access.USER,
    f"{_API}ServiceRegistryService/DeregisterService": Access.USER,
    # The caller's own tenant's resources; credentials in them are secret references.
    f"{_API}ResourceService/CreateResource": Access.USER,
    f"{_API}ResourceService/GetResource": Access.USER,
    f"{_API}ResourceService/ListResources": Access.USER,
    f"{_API}ResourceService/UpdateResource": Access.USER,
    f"{_API}ResourceService/DeleteResource": Access.USER,
    # Every tenant's entries, failed logins included.
    f"{_API}AuditService/ListAuditEvents": Access.ADMIN,
}
# Envoy calls the rate limit service without a credential; what it returns
# is a count, and what it counts is whatever identity the request carried.
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/envoy.service.ratelimit.v3.RateLimitService/",
)


def access_for(method: str) -> Access | None:
    """The declared access of a gRPC method path; None when undeclared."""
    if method.startswith(PUBLIC_PREFIXES):
        return Access.PUBLIC
    return PERMISSIONS.get(method)


def allowed(principal: Principal, access: Access) -> bool:
    """Whether `principal` may make a call needing `access`."""
    if access is Access.PUBLIC:
        return True
    if access is Access.ADMIN:
        return principal.is_admin
    if access is Access.OPERATOR:
        return principal.is_operator
    return bool(principal.roles & {USER, ADMIN})


# What the seed's `tenant_id:resource_id:permission` strings may ask for.
RESOURCE_PERMISSIONS = frozenset({"read", "write", "execute", "delete", "admin"})


def resource_allowed(tenant: str, roles: frozenset[str], resource_tenant: str, permission: str) -> tuple[bool, str]:
    """Whether a subject of `tenant` with `roles` may `permission` a resource of `resource_tenant`.

    The rule the RPC table applies, for resources a workflow names
    (PermissionCheckNode): admins may do anything in their own tenant, and
    those of the operator's tenant in every tenant; users anything but
    `admin`, in their own tenant only. Returns (allowed, why).
    """
    if permission not in RESOURCE_PERMISSIONS:
        return False, f"unknown permission {shown(permission)}; known: {', '.join(sorted(RESOURCE_PERMISSIONS))}"
    if ADMIN in roles and tenant == OPERATOR_TENANT:
        return True, f"the admin role in tenant {OPERATOR_TENANT!r} covers every tenant"
    if not roles & {ADMIN, USER}:
        return False, "no role that grants access"
    if resource_tenant != tenant:
        return False, "the resource belongs to another tenant"
    if ADMIN in roles:
        return True, "the admin role covers its own tenant"
    if permission == "admin":
        return False, "the admin permission needs the admin role"
    return True, "users may act on their own tenant's resources"
