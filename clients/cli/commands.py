"""`flowport sessions|workflows|webhooks|services|resources ...`: the API's objects from a shell.

Their get, list and delete commands (and the creates whose request is just
flags) are each one `Call`; the few that read a file or answer a verdict
have a handler here. Executions and events are in executions.py, a tenant's
secrets in secrets.py. A workflow or a resource is given as a JSON file in
the API's shape (`{"name": "main_db", "database": {"connection_string":
"…"}}`), so the file a team keeps in its repository is what the REST API takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import duration_pb2

from flowport.clients.cli.api_command import (
    Call,
    Out,
    add_command,
    add_file,
    add_group,
    add_limit,
    read_message,
)
from flowport.clients.cli.connect import EXIT_API_ERROR
from flowport.clients.cli.output import as_dict
from flowport.v1 import registry_pb2, resource_pb2, session_pb2, webhook_pb2, workflow_pb2

if TYPE_CHECKING:
    from flowport.clients import Client


def add_sessions(commands: Any) -> None:
    """Add `sessions` and its actions to the top-level subparsers."""
    sessions = add_group(commands, "sessions", "create, list, show and delete sessions")
    create = add_command(sessions, "create", "start a session", Call("sessions", "CreateSession", _new_session))
    create.add_argument("--user-id", default="", help="the session's user")
    create.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: the server's)")
    listing = add_command(
        sessions,
        "list",
        "live sessions, newest first",
        Call(
            "sessions",
            "ListSessions",
            lambda a: session_pb2.ListSessionsRequest(user_id=a.user_id),
            shows="list",
        ),
    )
    listing.add_argument("--user-id", default="", help="only this user's")
    add_limit(listing)
    get = Call("sessions", "GetSession", lambda a: session_pb2.GetSessionRequest(session_id=a.session_id))
    add_command(sessions, "get", "one session", get).add_argument("session_id")
    delete = Call(
        "sessions",
        "DeleteSession",
        lambda a: session_pb2.DeleteSessionRequest(session_id=a.session_id),
        shows="done",
        done="deleted session {session_id}",
    )
    add_command(sessions, "delete", "end a session", delete).add_argument("session_id")


def _new_session(args: argparse.Namespace) -> session_pb2.CreateSessionRequest:
    session = session_pb2.Session(user_id=args.user_id)
    if args.ttl is not None:
        session.ttl.FromSeconds(args.ttl)
    return session_pb2.CreateSessionRequest(session=session)


def add_workflows(commands: Any) -> None:
    """Add `workflows` and its actions to the top-level subparsers."""
    workflows = add_group(commands, "workflows", "create, validate, list, show and delete workflows")
    create = add_command(
        workflows,
        "create",
        "create a workflow (or a new version) from a JSON file",
        Call("workflows", "CreateWorkflow", _new_workflow),
    )
    add_file(create, "workflow")
    check = add_command(workflows, "validate", "check a workflow file without creating it", _workflow_validate)
    add_file(check, "workflow")
    listing = add_command(
        workflows,
        "list",
        "the latest version of each workflow, ordered by id",
        Call("workflows", "ListWorkflows", lambda _: workflow_pb2.ListWorkflowsRequest(), shows="list"),
    )
    add_limit(listing)
    get = add_command(
        workflows,
        "get",
        "one workflow",
        Call(
            "workflows",
            "GetWorkflow",
            lambda a: workflow_pb2.GetWorkflowRequest(workflow_id=a.workflow_id, version=a.version),
        ),
    )
    get.add_argument("workflow_id")
    get.add_argument("--version", type=int, default=0, help="a version (default: the latest)")
    delete = Call(
        "workflows",
        "DeleteWorkflow",
        lambda a: workflow_pb2.DeleteWorkflowRequest(workflow_id=a.workflow_id),
        shows="done",
        done="deleted workflow {workflow_id}",
    )
    add_command(workflows, "delete", "delete a workflow", delete).add_argument("workflow_id")


def _new_workflow(args: argparse.Namespace) -> workflow_pb2.CreateWorkflowRequest:
    return workflow_pb2.CreateWorkflowRequest(workflow=read_workflow(args.file))


def read_workflow(path: Path) -> workflow_pb2.Workflow:
    """The workflow in the JSON file at `path` ('-': stdin)."""
    workflow: workflow_pb2.Workflow = read_message(path, workflow_pb2.Workflow(), "a workflow")
    return workflow


def _workflow_validate(client: Client, args: argparse.Namespace, out: Out) -> int:
    verdict = client.workflows.ValidateWorkflow(workflow_pb2.ValidateWorkflowRequest(workflow=read_workflow(args.file)))
    if args.output == "json":
        out(json.dumps(as_dict(verdict), indent=2))
    elif verdict.valid:
        out(f"{args.file}: valid")
    else:
        out("\n".join(f"{args.file}: {e.field}: {e.description}" for e in verdict.errors))
    return 0 if verdict.valid else EXIT_API_ERROR


def add_webhooks(commands: Any) -> None:
    """Add `webhooks` and its actions to the top-level subparsers."""
    webhooks = add_group(commands, "webhooks", "register, list and remove webhooks")
    create = add_command(webhooks, "create", "register a webhook", Call("webhooks", "CreateWebhook", _new_webhook))
    create.add_argument("--url", required=True, help="where deliveries are POSTed")
    create.add_argument("--event-type", dest="event_types", action="append", default=[], help="repeatable")
    create.add_argument("--secret", default="", help="signs each delivery (X-Flowport-Signature)")
    listing = add_command(
        webhooks,
        "list",
        "webhooks",
        Call("webhooks", "ListWebhooks", lambda _: webhook_pb2.ListWebhooksRequest(), shows="list"),
    )
    add_limit(listing)
    get = Call("webhooks", "GetWebhook", lambda a: webhook_pb2.GetWebhookRequest(webhook_id=a.webhook_id))
    add_command(webhooks, "get", "one webhook", get).add_argument("webhook_id")
    delete = Call(
        "webhooks",
        "DeleteWebhook",
        lambda a: webhook_pb2.DeleteWebhookRequest(webhook_id=a.webhook_id),
        shows="done",
        done="deleted webhook {webhook_id}",
    )
    add_command(webhooks, "delete", "remove a webhook", delete).add_argument("webhook_id")
    deliveries = add_command(
        webhooks,
        "deliveries",
        "a webhook's deliveries",
        Call(
            "webhooks",
            "ListWebhookDeliveries",
            lambda a: webhook_pb2.ListWebhookDeliveriesRequest(webhook_id=a.webhook_id),
            shows="list",
        ),
    )
    deliveries.add_argument("webhook_id")
    add_limit(deliveries)


def _new_webhook(args: argparse.Namespace) -> webhook_pb2.CreateWebhookRequest:
    webhook = webhook_pb2.Webhook(url=args.url, event_types=args.event_types, secret=args.secret)
    return webhook_pb2.CreateWebhookRequest(webhook=webhook)


def add_services(commands: Any) -> None:
    """Add `services` and its actions to the top-level subparsers."""
    services = add_group(commands, "services", "register, list, renew and remove external services")
    register = add_command(
        services,
        "register",
        "register a service (or replace the registration)",
        Call("services", "RegisterService", _new_service),
    )
    register.add_argument("service_id")
    register.add_argument("--endpoint", required=True, help="its http(s) URL, or grpc(s)://host:port")
    register.add_argument("--capability", dest="capabilities", action="append", default=[], help="repeatable")
    register.add_argument("--provider", default="", help="e.g. internal, trusted_partners")
    register.add_argument("--zone", dest="zones", action="append", default=[], help="compliance zone; repeatable")
    register.add_argument("--health-path", default="", help="path GET-checked for health, e.g. /health")
    register.add_argument(
        "--health-service", default="", help="gRPC endpoints: the service name asked of grpc.health.v1 (default: all)"
    )
    register.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime without a heartbeat (default: none)")
    listing = add_command(
        services,
        "list",
        "registered services, by id",
        Call(
            "services",
            "ListServices",
            lambda a: registry_pb2.ListServicesRequest(
                capabilities=a.capabilities, provider=a.provider, compliance_zone=a.zone
            ),
            shows="list",
        ),
    )
    listing.add_argument("--capability", dest="capabilities", action="append", default=[], help="has all of these")
    listing.add_argument("--provider", default="", help="only this provider's")
    listing.add_argument("--zone", default="", help="only those allowed in this compliance zone")
    add_limit(listing)
    get = Call("services", "GetService", lambda a: registry_pb2.GetServiceRequest(service_id=a.service_id))
    add_command(services, "get", "one service", get).add_argument("service_id")
    heartbeat = Call("services", "Heartbeat", lambda a: registry_pb2.HeartbeatRequest(service_id=a.service_id))
    add_command(services, "heartbeat", "renew a service's TTL", heartbeat).add_argument("service_id")
    deregister = Call(
        "services",
        "DeregisterService",
        lambda a: registry_pb2.DeregisterServiceRequest(service_id=a.service_id),
        shows="done",
        done="deregistered service {service_id}",
    )
    add_command(services, "deregister", "remove a service", deregister).add_argument("service_id")


def _new_service(args: argparse.Namespace) -> registry_pb2.RegisterServiceRequest:
    service = registry_pb2.RegisteredService(
        service_id=args.service_id,
        endpoint=args.endpoint,
        capabilities=args.capabilities,
        provider=args.provider,
        compliance_zones=args.zones,
        health_path=args.health_path,
        health_service=args.health_service,
    )
    if args.ttl is not None:
        service.ttl.CopyFrom(duration_pb2.Duration(seconds=args.ttl))
    return registry_pb2.RegisterServiceRequest(service=service)


def add_resources(commands: Any) -> None:
    """Add `resources` and its actions to the top-level subparsers."""
    help_text = "create, list, change and delete shared database pools and HTTP profiles"
    resources = add_group(commands, "resources", help_text)
    create = add_command(
        resources,
        "create",
        "create a resource from a JSON file",
        Call("resources", "CreateResource", _new_resource),
    )
    add_file(create, "resource")
    update = add_command(
        resources,
        "update",
        "replace a resource's settings from a JSON file",
        Call(
            "resources",
            "UpdateResource",
            lambda a: resource_pb2.UpdateResourceRequest(name=a.name, resource=_read_resource(a.file)),
        ),
    )
    update.add_argument("name")
    add_file(update, "resource")
    listing = add_command(
        resources,
        "list",
        "resources, by name",
        Call("resources", "ListResources", lambda _: resource_pb2.ListResourcesRequest(), shows="list"),
    )
    add_limit(listing)
    get = Call("resources", "GetResource", lambda a: resource_pb2.GetResourceRequest(name=a.name))
    add_command(resources, "get", "one resource", get).add_argument("name")
    delete = Call(
        "resources",
        "DeleteResource",
        lambda a: resource_pb2.DeleteResourceRequest(name=a.name),
        shows="done",
        done="deleted resource {name}",
    )
    add_command(resources, "delete", "delete a resource (closing its pools)", delete).add_argument("name")


def _new_resource(args: argparse.Namespace) -> resource_pb2.CreateResourceRequest:
    return resource_pb2.CreateResourceRequest(resource=_read_resource(args.file))


def _read_resource(path: Path) -> resource_pb2.Resource:
    resource: resource_pb2.Resource = read_message(path, resource_pb2.Resource(), "a resource")
    return resource
