"""The OpenAPI 3.1 document of the REST surface, generated from the
descriptor set: paths and parameters from the `google.api.http` rules,
schemas from the messages in the proto3 JSON mapping Envoy prints (proto
field names, int64 as strings, enums by name), descriptions from the .proto
comments, and every error as a `google.rpc.Status`.

Written by `python -m flowport.transcoder.codegen` to
`transcoder/openapi.json` and served by Envoy at `GET /openapi.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2

from flowport.transcoder.http_rules import API_PACKAGE, Binding, Method, descriptor_set, methods

FDP = descriptor_pb2.FieldDescriptorProto
Schema = dict[str, Any]

_SCALARS: dict[int, Schema] = {
    FDP.TYPE_DOUBLE: {"type": "number"},
    FDP.TYPE_FLOAT: {"type": "number"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "int32", "minimum": 0},
    # The JSON mapping prints 64-bit integers as strings and reads either.
    FDP.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FDP.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    FDP.TYPE_SFIXED64: {"type": ["string", "integer"], "format": "int64"},
    FDP.TYPE_UINT64: {"type": ["string", "integer"], "format": "int64"},
    FDP.TYPE_FIXED64: {"type": ["string", "integer"], "format": "int64"},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "examples": ["30s"]},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
# Messages whose JSON form is one string, which Envoy's transcoder also
# accepts as a query parameter (e.g. `?start_time=2025-01-31T00:00:00Z`).
_QUERY_MESSAGES = frozenset({"google.protobuf.Timestamp"})
STATUS = "google.rpc.Status"
# Bounds the server enforces that proto3 cannot express; in the document so
# clients (and fuzzers) know them.
FIELD_CONSTRAINTS: dict[str, Schema] = {
    "page_size": {"minimum": 0},
    "version": {"minimum": 0},
    "workflow_version": {"minimum": 0},
    "request_id": {"maxLength": 128},
}
STREAM_NOTE = (
    "Server stream. With `Accept: text/event-stream` each message is a server-sent event "
    "(`data: {json}`); otherwise newline-delimited JSON. A failure after the first message ends "
    "the stream with an event of type `error` (HTTP/1.1 has no trailers)."
)


def _text(comment: str) -> str:
    """A .proto comment as prose: lines stripped, paragraphs kept."""
    return "\n".join(line.strip() for line in comment.strip().splitlines())


def _summary(comment: str, fallback: str) -> str:
    first = " ".join(_text(comment).split("\n\n", 1)[0].split())
    sentence = first.split(". ", 1)[0].rstrip(".")
    return sentence or fallback


class _Builder:
    def __init__(self, descriptor: Path | None) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        for file in descriptor_set(descriptor).file:
            comments = {tuple(loc.path): _text(loc.leading_comments) for loc in file.source_code_info.location}
            for i, message in enumerate(file.message_type):
                self._index(file.package, message, (4, i), comments)
            for enum in file.enum_type:
                self.enums[f"{file.package}.{enum.name}"] = enum
        self.components: dict[str, Schema] = {}

    def _index(
        self,
        prefix: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        self.comments[name] = comments.get(path, "")
        for j, field in enumerate(message.field):
            self.comments[f"{name}#{field.name}"] = comments.get((*path, 2, j), "")
        for j, nested in enumerate(message.nested_type):
            self._index(name, nested, (*path, 3, j), comments)
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum

    def ref(self, type_name: str) -> Schema:
        """A schema for a message type: inline for well-known types, else a $ref."""
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        if type_name not in self.components:
            self.components[type_name] = {}  # placeholder against recursion
            self.components[type_name] = self.message_schema(type_name)
        return {"$ref": f"#/components/schemas/{type_name}"}

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        if field.type == FDP.TYPE_MESSAGE:
            type_name = field.type_name.lstrip(".")
            entry = self.messages.get(type_name)
            if entry is not None and entry.options.map_entry:
                return {"type": "object", "additionalProperties": self.field_schema(entry.field[1])}
            schema = self.ref(type_name)
        elif field.type == FDP.TYPE_ENUM:
            enum = self.enums[field.type_name.lstrip(".")]
            schema = {"type": "string", "enum": [v.name for v in enum.value]}
        else:
            schema = dict(_SCALARS[field.type])
        if field.label == FDP.LABEL_REPEATED:
            return {"type": "array", "items": schema}
        return schema

    def message_schema(self, type_name: str, omit: frozenset[str] = frozenset(), *, relaxed: bool = False) -> Schema:
        """A message's schema; `relaxed` drops required fields (for validating calls)."""
        message = self.messages[type_name]
        properties: dict[str, Schema] = {}
        required = []
        for field in message.field:
            if field.name in omit:
                continue
            schema = self.field_schema(field)
            if field.name in FIELD_CONSTRAINTS and field.label != FDP.LABEL_REPEATED:
                schema = {**schema, **FIELD_CONSTRAINTS[field.name]}
            behaviours = set(field.options.Extensions[field_behavior_pb2.field_behavior])
            description = self.comments.get(f"{type_name}#{field.name}", "")
            extra: Schema = {}
            if description:
                extra["description"] = description
            if field_behavior_pb2.OUTPUT_ONLY in behaviours:
                extra["readOnly"] = True
            if field_behavior_pb2.INPUT_ONLY in behaviours:
                extra["writeOnly"] = True
            if extra:
                schema = {"allOf": [schema], **extra} if "$ref" in schema else {**schema, **extra}
            properties[field.name] = schema
            if field_behavior_pb2.REQUIRED in behaviours:
                required.append(field.name)
        # The transcoder refuses unknown fields.
        result: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
        if required and not relaxed:
            result["required"] = required
        exclusive = self._oneof_pairs(message, omit)
        if exclusive:
            result["allOf"] = [{"not": {"required": list(pair)}} for pair in exclusive]
        if self.comments.get(type_name):
            result["description"] = self.comments[type_name]
        return result

    @staticmethod
    def _oneof_pairs(message: descriptor_pb2.DescriptorProto, omit: frozenset[str]) -> list[tuple[str, str]]:
        """Pairs of fields that may not both be set (members of one oneof)."""
        groups: dict[int, list[str]] = {}
        for field in message.field:
            if field.HasField("oneof_index") and not field.proto3_optional and field.name not in omit:
                groups.setdefault(field.oneof_index, []).append(field.name)
        return [(a, b) for names in groups.values() for i, a in enumerate(names) for b in names[i + 1 :]]

    def _has_required(self, type_name: str) -> bool:
        message = self.messages.get(type_name)
        return message is not None and any(
            field_behavior_pb2.REQUIRED in field.options.Extensions[field_behavior_pb2.field_behavior]
            for field in message.field
        )

    def operation(self, method: Method, binding: Binding, index: int) -> Schema:
        request_type = f"{API_PACKAGE}.{method.input_type.rsplit('.', 1)[1]}"
        request = self.messages[request_type]
        fields = {f.name: f for f in request.field}
        path_params = binding.path_params
        parameters: list[Schema] = [
            {"name": p, "in": "path", "required": True, "schema": self.field_schema(fields[p])} for p in path_params
        ]
        operation: Schema = {
            "operationId": f"{method.service}_{method.name}" + (f"_{index + 1}" if index else ""),
            "tags": [method.service],
            "summary": _summary(method.comment, method.name),
            "description": _text(method.comment),
        }
        # Validating calls take any workflow: reporting what is wrong is their job.
        relaxed = method.name.startswith("Validate")
        if binding.body == "*":
            schema = self.message_schema(request_type, omit=frozenset(path_params))
            body_required = bool(schema.get("required"))
            operation["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": schema}}}
        elif binding.body:
            body_field = fields[binding.body]
            body_type = body_field.type_name.lstrip(".")
            body_schema = self.message_schema(body_type, relaxed=True) if relaxed else self.field_schema(body_field)
            operation["requestBody"] = {
                "required": not relaxed and self._has_required(body_type),
                "content": {"application/json": {"schema": body_schema}},
            }
        query_fields = (
            []
            if binding.body == "*"
            else [f for f in request.field if f.name not in path_params and f.name != binding.body]
        )
        for field in query_fields:
            if field.type == FDP.TYPE_MESSAGE and field.type_name.lstrip(".") not in _QUERY_MESSAGES:
                continue  # only scalars (and types written as one string) travel in the query string
            schema = self.field_schema(field)
            if field.name in FIELD_CONSTRAINTS and field.label != FDP.LABEL_REPEATED:
                schema = {**schema, **FIELD_CONSTRAINTS[field.name]}
            parameter: Schema = {"name": field.name, "in": "query", "required": False, "schema": schema}
            description = self.comments.get(f"{request_type}#{field.name}", "")
            if description:
                parameter["description"] = description
            if field.label == FDP.LABEL_REPEATED:
                parameter["explode"] = True
            parameters.append(parameter)
        if parameters:
            operation["parameters"] = parameters
        response_type = method.output_type
        response_schema = self.ref(response_type)
        if method.server_streaming:
            operation["description"] = f"{_text(method.comment)}\n\n{STREAM_NOTE}".strip()
            content = {
                "text/event-stream": {"schema": {"type": "string"}},
                "application/json": {"schema": response_schema},
            }
            operation["x-flowport-stream"] = True
        elif response_type.lstrip(".") == "google.api.HttpBody":
            # The body is the RPC's own bytes with its own type: GetMetrics is Prometheus text.
            content = {"text/plain": {"schema": {"type": "string"}}}
        else:
            content = {"application/json": {"schema": response_schema}}
        operation["responses"] = {
            "200": {"description": "OK", "content": content},
            "default": {
                "description": "An error: google.rpc.Status with ErrorInfo and, for bad input, BadRequest details.",
                "content": {"application/json": {"schema": self.ref(STATUS)}},
            },
        }
        return operation


def document(version: str, descriptor: Path | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-ready dict) for the descriptor set at `descriptor`."""
    builder = _Builder(descriptor)
    paths: dict[str, dict[str, Any]] = {}
    for method in methods(descriptor):
        for index, binding in enumerate(method.bindings):
            paths.setdefault(binding.template, {})[binding.verb] = builder.operation(method, binding, index)
    paths["/healthz"] = {
        "get": {
            "operationId": "Envoy_Healthz",
            "tags": ["Envoy"],
            "summary": "Answered by Envoy: 200 while at least one server is healthy, 503 otherwise.",
            "responses": {
                "200": {"description": "a healthy upstream exists"},
                "503": {"description": "none is healthy"},
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "Envoy_OpenApi",
            "tags": ["Envoy"],
            "summary": "This document.",
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flowport",
            "version": version,
            "description": "REST/JSON surface of the flowport gRPC API, transcoded by Envoy. Generated from proto/.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(builder.components.items()))},
    }
