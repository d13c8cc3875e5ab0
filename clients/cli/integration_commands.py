"""`flowport services|resources ...`: the service registry and shared resources from a shell.

The same conventions as the other API commands (clients/commands.py):
`--output table|json`, errors as one line on stderr, the exit codes in
`--help`. A resource is given as a JSON file in the API's shape
(`{"name": "main_db", "database": {"connection_string": "…"}}`), so the
file a team keeps in its repository is what `POST /api/resources` takes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowport.clients.cli.commands import Out, _command, _group, _limited, _show, read_message

if TYPE_CHECKING:
    from flowport.clients import Client


def add_integration_parsers(commands: Any) -> None:
    """Add `services` and `resources` to the top-level subparsers."""
    services = _group(commands, "services", "register, list, renew and remove external services")
    register = _command(services, "register", "register a service (or replace the registration)", _service_register)
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
    listing = _command(services, "list", "registered services, by id", _service_list)
    listing.add_argument("--capability", dest="capabilities", action="append", default=[], help="has all of these")
    listing.add_argument("--provider", default="", help="only this provider's")
    listing.add_argument("--zone", default="", help="only those allowed in this compliance zone")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _command(services, "get", "one service", _service_get).add_argument("service_id")
    _command(services, "heartbeat", "renew a service's TTL", _service_heartbeat).add_argument("service_id")
    _command(services, "deregister", "remove a service", _service_deregister).add_argument("service_id")

    resources = _group(commands, "resources", "create, list, change and delete shared database pools and HTTP profiles")
    create = _command(resources, "create", "create a resource from a JSON file", _resource_create)
    create.add_argument("-f", "--file", type=Path, required=True, help="the resource as JSON ('-' reads stdin)")
    update = _command(resources, "update", "replace a resource's settings from a JSON file", _resource_update)
    update.add_argument("name")
    update.add_argument("-f", "--file", type=Path, required=True, help="the resource as JSON ('-' reads stdin)")
    listing = _command(resources, "list", "resources, by name", _resource_list)
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _command(resources, "get", "one resource", _resource_get).add_argument("name")
    _command(resources, "delete", "delete a resource (closing its pools)", _resource_delete).add_argument("name")


# -- services -------------------------------------------------------------


def _service_register(client: Client, args: argparse.Namespace, out: Out) -> int:
    from google.protobuf import duration_pb2

    from flowport.v1 import registry_pb2

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
    registered = client.services.RegisterService(registry_pb2.RegisterServiceRequest(service=service))
    _show(out, args, [registered], single=True)
    return 0


def _service_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import registry_pb2

    request = registry_pb2.ListServicesRequest(
        page_size=min(args.limit, 100),
        capabilities=args.capabilities,
        provider=args.provider,
        compliance_zone=args.zone,
    )
    _show(out, args, _limited(client.paginate(client.services.ListServices, request), args.limit))
    return 0


def _service_get(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import registry_pb2

    _show(
        out, args, [client.services.GetService(registry_pb2.GetServiceRequest(service_id=args.service_id))], single=True
    )
    return 0


def _service_heartbeat(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import registry_pb2

    _show(
        out, args, [client.services.Heartbeat(registry_pb2.HeartbeatRequest(service_id=args.service_id))], single=True
    )
    return 0


def _service_deregister(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import registry_pb2

    client.services.DeregisterService(registry_pb2.DeregisterServiceRequest(service_id=args.service_id))
    print(f"deregistered service {args.service_id}", file=sys.stderr)
    return 0


# -- resources ------------------------------------------------------------


def _read_resource(path: Path) -> Any:
    from flowport.v1 import resource_pb2

    return read_message(path, resource_pb2.Resource(), "a resource")


def _resource_create(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import resource_pb2

    request = resource_pb2.CreateResourceRequest(resource=_read_resource(args.file))
    _show(out, args, [client.resources.CreateResource(request)], single=True)
    return 0


def _resource_update(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import resource_pb2

    request = resource_pb2.UpdateResourceRequest(name=args.name, resource=_read_resource(args.file))
    _show(out, args, [client.resources.UpdateResource(request)], single=True)
    return 0


def _resource_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import resource_pb2

    request = resource_pb2.ListResourcesRequest(page_size=min(args.limit, 100))
    _show(out, args, _limited(client.paginate(client.resources.ListResources, request), args.limit))
    return 0


def _resource_get(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import resource_pb2

    _show(out, args, [client.resources.GetResource(resource_pb2.GetResourceRequest(name=args.name))], single=True)
    return 0


def _resource_delete(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import resource_pb2

    client.resources.DeleteResource(resource_pb2.DeleteResourceRequest(name=args.name))
    print(f"deleted resource {args.name}", file=sys.stderr)
    return 0
