"""MCPServiceDiscoveryNode: the tenant's registered services that fit a workflow's needs.

It reads the service registry (ServiceRegistryService) of the execution's
tenant only, never another's. The config has the seed's shape:
`tenant_context` (`compliance_zones` a service must all support; an `id`
must be the execution's tenant), `required_capabilities` (all of them),
`preferred_providers` (their services first, in that order), `health_check`
(only services whose last check passed), `load_balancing` (`round_robin`,
`least_latency` or `random`: the order of the list, whose first entry is
`selected`) and `cache_duration` (seconds the tenant's matching list is
reused before the registry is read again).

Outputs `services` (also as `result`, so the seed's connection from
`result` works), `count` and `selected`. Each service is
`{id, endpoint, capabilities, provider, compliance_zones, metadata,
health: {status: healthy|unhealthy|unknown, latency, checked_at}}`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

from google.protobuf import json_format

from flowport.server.clock import now_us
from flowport.server.nodes.base import MAX_OUTPUT_BYTES, JsonSchema, NodeContext, NodeError, NodeType
from flowport.server.nodes.substitution import Budget, substitute
from flowport.v1 import registry_pb2

BALANCING = ("round_robin", "least_latency", "random")
STATUS = {
    registry_pb2.RegisteredService.STATUS_HEALTHY: "healthy",
    registry_pb2.RegisteredService.STATUS_UNHEALTHY: "unhealthy",
    registry_pb2.RegisteredService.STATUS_UNSPECIFIED: "unknown",
}
PAGE = 500
# Registrations written into outputs between two yields to the event loop (up to about 1 ms each).
PAGE_DESCRIBED = 64
# Names a registration holds at most (server/api/service_registry.py's MAX_LABELS): a node
# requiring more matches nothing.
MAX_REQUIRED = 32
MAX_SERVICES = 5000
# Filters whose results and round-robin turns the node remembers, over every tenant: the filters
# may come from execution inputs, so without a bound each new one would be kept for good.
MAX_REMEMBERED = 1024
# Registrations the cache holds in all (each at most 16 KiB of metadata): one entry may hold up to
# MAX_SERVICES of them.
MAX_CACHED_SERVICES = 20_000


def describe(service: registry_pb2.RegisteredService) -> dict[str, Any]:
    """A registration in the node's output shape."""
    return {
        "id": service.service_id,
        "endpoint": service.endpoint,
        "capabilities": list(service.capabilities),
        "provider": service.provider,
        "compliance_zones": list(service.compliance_zones),
        "metadata": json_format.MessageToDict(service.metadata),
        "health": {
            "status": STATUS.get(service.status, "unknown"),
            "latency": service.latency_ms,
            "checked_at": service.check_time.ToJsonString() if service.HasField("check_time") else None,
        },
    }


class MCPServiceDiscoveryNode(NodeType):
    """Finds the execution's tenant's services by capability, zone, provider and health."""

    type_name = "MCPServiceDiscoveryNode"
    description = (
        "Lists the tenant's registered services (/api/services) that have every `required_capabilities` and "
        "support every `tenant_context.compliance_zones`, healthy ones only with `health_check`, ordered by "
        "`preferred_providers` then `load_balancing`; outputs `services`, `count` and `selected`."
    )
    category = "integration"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {
            "tenant_context": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "compliance_zones": {"type": "array", "items": {"type": "string"}},
                    "service_tier": {"type": "string"},
                },
            },
            "required_capabilities": {"type": "array", "items": {"type": "string"}, "default": []},
            "preferred_providers": {"type": "array", "items": {"type": "string"}, "default": []},
            "cache_duration": {"type": "number", "minimum": 0, "maximum": 86400, "default": 0},
            "health_check": {"type": "boolean", "default": True},
            "load_balancing": {"enum": list(BALANCING), "default": "round_robin"},
        },
        "additionalProperties": False,
    }
    inputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {}}
    outputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {
            "services": {"type": "array", "items": {"type": "object"}},
            "count": {"type": "integer"},
            "selected": {"type": ["object", "null"]},
        },
    }
    output_aliases: ClassVar[Mapping[str, str]] = {"result": "services"}
    retry_safe = True
    default_timeout = 10.0

    def __init__(self) -> None:
        super().__init__()
        # (tenant, filters) -> (read at, matching registrations), for cache_duration; least recently
        # stored first.
        self._cache: OrderedDict[tuple[Any, ...], tuple[float, list[registry_pb2.RegisteredService]]] = OrderedDict()
        self._cached = 0  # registrations held in _cache
        # Round-robin positions per (tenant, filters), least recently used first.
        self._turns: OrderedDict[tuple[Any, ...], itertools.count[int]] = OrderedDict()

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        directory = ctx.services.registry
        if directory is None:
            raise NodeError("the service registry is not available in this server", reason="NODE_UNAVAILABLE")
        # Kailash configs name the tenant as `${tenant_id}`: resolved here like any other reference.
        budget = Budget()  # one for all the node's parameters
        tenant_context = substitute(params.get("tenant_context") or {}, params, budget=budget)
        named = tenant_context.get("id")
        if named not in (None, "", ctx.tenant):
            raise NodeError(
                f"tenant_context.id {str(named)[:64]!r} is not this execution's tenant", reason="TENANT_MISMATCH"
            )
        required = substitute(params.get("required_capabilities") or [], params, budget=budget)
        zones_given = tenant_context.get("compliance_zones") or []
        wanted: list[set[str]] = []
        for name, given in (("required_capabilities", required), ("tenant_context.compliance_zones", zones_given)):
            if not isinstance(given, list) or not all(isinstance(item, str) for item in given):
                raise NodeError(f"{name} must be a list of names", reason="INVALID_PARAMETER")
            names = set(given)
            if len(names) > MAX_REQUIRED:
                raise NodeError(
                    f"{name} has {len(names)} names; a service has at most {MAX_REQUIRED}, so none would match",
                    reason="INVALID_PARAMETER",
                )
            wanted.append(names)
        capabilities, zones = sorted(wanted[0]), sorted(wanted[1])
        healthy_only = bool(params.get("health_check", True))
        key = (ctx.tenant, tuple(capabilities), tuple(zones), healthy_only)
        matching = await self._matching(directory, ctx.tenant, key, float(params.get("cache_duration") or 0))
        preferred = list(substitute(params.get("preferred_providers") or [], params, budget=budget))
        ordered = self._order(matching, key, params.get("load_balancing", "round_robin"))
        rank = {provider: i for i, provider in enumerate(preferred)}
        # A stable sort: preference first, the balancing order within each provider.
        ordered.sort(key=lambda s: rank.get(s.provider, len(rank)))
        services = []
        size = 0
        for n, service in enumerate(ordered, 1):
            # Refused before the registrations are written out (their protobuf size is less than
            # their JSON's), and other calls run between every PAGE_DESCRIBED of them.
            size += service.ByteSize()
            if size > MAX_OUTPUT_BYTES:
                raise NodeError(
                    f"the matching services' registrations pass a node's {MAX_OUTPUT_BYTES} bytes of outputs: "
                    "require more capabilities or zones",
                    reason="OUTPUT_TOO_LARGE",
                )
            services.append(describe(service))
            if n % PAGE_DESCRIBED == 0:
                await asyncio.sleep(0)
        return {
            "services": services,
            "count": len(services),
            "selected": next(iter(services), None),
        }

    async def _matching(
        self, directory: Any, tenant: str, key: tuple[Any, ...], cache_for: float
    ) -> list[registry_pb2.RegisteredService]:
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < cache_for:
            return cached[1]
        _, capabilities, zones, healthy_only = key
        wanted_capabilities, wanted_zones = set(capabilities), set(zones)
        found: list[registry_pb2.RegisteredService] = []
        after: str | None = None
        while len(found) < MAX_SERVICES:
            page = await directory.list_services(tenant, provider="", after=after, limit=PAGE, now_us=now_us())
            for service in page:
                if not wanted_capabilities.issubset(service.capabilities):
                    continue
                if not wanted_zones.issubset(service.compliance_zones):
                    continue
                if healthy_only and service.status != registry_pb2.RegisteredService.STATUS_HEALTHY:
                    continue
                found.append(service)
            if len(page) < PAGE:
                break
            after = page[-1].service_id
        if cache_for > 0:
            replaced = self._cache.pop(key, None)
            self._cached -= 0 if replaced is None else len(replaced[1])
            self._cache[key] = (time.monotonic(), found)
            self._cached += len(found)
            while len(self._cache) > MAX_REMEMBERED or (self._cached > MAX_CACHED_SERVICES and len(self._cache) > 1):
                _, (_, gone) = self._cache.popitem(last=False)
                self._cached -= len(gone)
        return found

    def _order(
        self, services: list[registry_pb2.RegisteredService], key: tuple[Any, ...], how: str
    ) -> list[registry_pb2.RegisteredService]:
        ordered = sorted(services, key=lambda s: s.service_id)
        if how == "least_latency":
            # Unchecked services (no latency yet) last.
            ordered.sort(key=lambda s: (not s.HasField("check_time"), s.latency_ms))
        elif how == "random":
            random.shuffle(ordered)
        elif ordered:
            turns = self._turns.get(key)
            if turns is None:
                turns = self._turns[key] = itertools.count()
                if len(self._turns) > MAX_REMEMBERED:
                    self._turns.popitem(last=False)
            else:
                self._turns.move_to_end(key)
            turn = next(turns) % len(ordered)
            ordered = ordered[turn:] + ordered[:turn]
        return ordered
