"""Retries of calls that are safe to repeat, through gRPC's service config.

A unary method is retried on UNAVAILABLE (the server or Envoy's upstream is
down or restarting), with exponential backoff and jitter done by gRPC
itself, when the API says it is safe: `idempotency_level` NO_SIDE_EFFECTS or
IDEMPOTENT in the .proto, or its request carries a `request_id` (the
clients fill one in, so the server answers a repeat with its first result).
"""

from __future__ import annotations

import json
from functools import cache

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor

from flowport.v1 import (
    apikey_pb2,
    audit_pb2,
    event_pb2,
    execution_pb2,
    gateway_pb2,
    registry_pb2,
    schema_pb2,
    secret_pb2,
    session_pb2,
    webhook_pb2,
    workflow_pb2,
)

_MODULES = (
    apikey_pb2,
    audit_pb2,
    event_pb2,
    execution_pb2,
    gateway_pb2,
    registry_pb2,
    schema_pb2,
    secret_pb2,
    session_pb2,
    webhook_pb2,
    workflow_pb2,
)
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
def retried_methods() -> tuple[tuple[str, str], ...]:
    """(service, method) of every method the clients retry."""
    return tuple(
        (service.full_name, method.name)
        for module in _MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
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
