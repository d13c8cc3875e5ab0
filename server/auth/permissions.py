"""Who may call what: one declaration per RPC, checked in one place.

`PUBLIC` needs no credential (health checks and reflection, which only
describes the API that /openapi.json publishes anyway); `USER` needs a
valid credential for the tenant; `ADMIN` needs the admin role. A test
fails when an RPC of the API has no entry here.
"""

from __future__ import annotations

from enum import Enum

from flowport.server.auth.principal import ADMIN, USER, Principal


class Access(Enum):
    """What a caller needs to make a call."""

    PUBLIC = "public"
    USER = USER
    ADMIN = ADMIN


_API = "/flowport.v1."
PERMISSIONS: dict[str, Access] = {
    f"{_API}GatewayService/GetInfo": Access.USER,
    f"{_API}GatewayService/GetHealth": Access.PUBLIC,
    # Counters of the whole server, every tenant's work included.
    f"{_API}GatewayService/GetStats": Access.ADMIN,
    f"{_API}SessionService/CreateSession": Access.USER,
    f"{_API}SessionService/GetSession": Access.USER,
    f"{_API}SessionService/ListSessions": Access.USER,
    f"{_API}SessionService/DeleteSession": Access.USER,
    f"{_API}WorkflowService/CreateWorkflow": Access.USER,
    f"{_API}WorkflowService/GetWorkflow": Access.USER,
    f"{_API}WorkflowService/ListWorkflows": Access.USER,
    f"{_API}WorkflowService/DeleteWorkflow": Access.USER,
    f"{_API}WorkflowService/ValidateWorkflow": Access.USER,
    f"{_API}ExecutionService/CreateExecution": Access.USER,
    f"{_API}ExecutionService/GetExecution": Access.USER,
    f"{_API}ExecutionService/ListExecutions": Access.USER,
    f"{_API}ExecutionService/CancelExecution": Access.USER,
    f"{_API}ExecutionService/WatchExecution": Access.USER,
    f"{_API}EventService/StreamEvents": Access.USER,
    f"{_API}WebhookService/CreateWebhook": Access.USER,
    f"{_API}WebhookService/GetWebhook": Access.USER,
    f"{_API}WebhookService/ListWebhooks": Access.USER,
    f"{_API}WebhookService/DeleteWebhook": Access.USER,
    f"{_API}WebhookService/ListWebhookDeliveries": Access.USER,
    f"{_API}WebhookService/RedeliverWebhookDelivery": Access.USER,
    f"{_API}SchemaService/ListNodeSchemas": Access.USER,
    f"{_API}SchemaService/GetNodeSchema": Access.USER,
    f"{_API}SchemaService/GetWorkflowSchema": Access.USER,
    f"{_API}ApiKeyService/CreateApiKey": Access.ADMIN,
    f"{_API}ApiKeyService/GetApiKey": Access.ADMIN,
    f"{_API}ApiKeyService/ListApiKeys": Access.ADMIN,
    f"{_API}ApiKeyService/RevokeApiKey": Access.ADMIN,
}
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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
    return bool(principal.roles & {USER, ADMIN})
