"""Calls made safe to retry by their `request_id`: which they are, and the Lua filter that marks them.

A method that is not idempotent but whose request has a top-level string
`request_id` (CreateExecution, CreateSession, ...) is deduplicated by the
server: a repeat with the same id answers what the first call made. Envoy
retries such a call on another server like an idempotent one, but only when
the id is set, which only the body tells: request_ids.lua reads it and marks
the call with MARK_HEADER, which its route matches (transcoder/envoy_routes.py).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2

from flowport.transcoder.http_rules import descriptor_set, methods

# Set by request_ids.lua; removed from what clients send (transcoder/envoy_config.py).
MARK_HEADER = "x-flowport-request-id-set"
REQUEST_ID = "request_id"
# Creates whose replay answers differently from the first call: a retry would "succeed" without
# what only the first answer carries (a new API key's secret is shown once).
NOT_RETRIED = frozenset({"/flowport.v1.ApiKeyService/CreateApiKey"})


def request_id_fields(path: Path | None = None) -> dict[str, int]:
    """gRPC path -> field number of `request_id`, for each unary method that is not idempotent
    and whose request message has one (a top-level string)."""
    messages = {
        f"{file.package}.{message.name}": message for file in descriptor_set(path).file for message in file.message_type
    }
    found: dict[str, int] = {}
    for method in methods(path):
        if method.idempotent or method.server_streaming or method.grpc_path in NOT_RETRIED:
            continue
        for field in messages[method.input_type].field:
            if field.name == REQUEST_ID and field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                found[method.grpc_path] = field.number
    return found


def lua_source(path: Path | None = None) -> str:
    """request_ids.lua with MARK_HEADER and its REQUEST_ID_FIELDS table in front."""
    entries = "".join(f'  ["{grpc_path}"] = {number},\n' for grpc_path, number in request_id_fields(path).items())
    code = resources.files("flowport.transcoder").joinpath("request_ids.lua").read_text("utf-8")
    return f'local MARK_HEADER = "{MARK_HEADER}"\nlocal REQUEST_ID_FIELDS = {{\n{entries}}}\n\n{code}'
