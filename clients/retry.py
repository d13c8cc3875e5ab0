"""Retries of calls that are safe to repeat, through gRPC's service config.

A unary method is retried on UNAVAILABLE (the server or Envoy's upstream is
down or restarting), with exponential backoff and jitter done by gRPC
itself, when the API says it is safe: `idempotency_level` NO_SIDE_EFFECTS or
IDEMPOTENT in the .proto, or its request carries a `request_id` (the
clients fill one in, so the server answers a repeat with its first result).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from functools import cache

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

import flowport.v1

_SAFE_LEVELS = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)


def safe_to_retry(method: MethodDescriptor) -> bool:
    """Whether gRPC should repeat `method` after UNAVAILABLE: unary, and unable to do anything twice.

    Server streams are left out: the SDK's iterators resume them from the
    last event they saw (streams.py), and a stream gRPC retried underneath
    them could hang through a restart instead of failing so they reconnect.
    """
    if method.server_streaming:
        return False
    return method.GetOptions().idempotency_level in _SAFE_LEVELS or "request_id" in method.input_type.fields_by_name


@cache
def api_services() -> tuple[ServiceDescriptor, ...]:
    """Every service of the flowport.v1 API, found in its generated modules (a new .proto needs no edit here)."""
    modules = [
        importlib.import_module(f"{flowport.v1.__name__}.{info.name}")
        for info in pkgutil.iter_modules(flowport.v1.__path__)
        if info.name.endswith("_pb2")
    ]
    return tuple(service for module in modules for service in module.DESCRIPTOR.services_by_name.values())


@cache
def retried_methods() -> tuple[tuple[str, str], ...]:
    """(service, method) of every method the clients retry."""
    return tuple(
        (service.full_name, method.name)
        for service in api_services()
        for method in service.methods
        if safe_to_retry(method)
    )


def service_config(attempts: int, initial_backoff: float = 0.1, max_backoff: float = 2.0) -> str:
    """The channel's service config (JSON): the retry policy on every retried method."""
    if attempts < 1:
        raise ValueError("attempts must be 1 or more")
    config: dict[str, object] = {"methodConfig": []}
    if attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": service, "method": method} for service, method in retried_methods()],
                "retryPolicy": {
                    # gRPC caps maxAttempts at 5.
                    "maxAttempts": min(attempts, 5),
                    "initialBackoff": f"{initial_backoff}s",
                    "maxBackoff": f"{max_backoff}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)
