"""The messages of Envoy's rate limit service protocol, as far as flowport uses them.

Envoy calls `/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
and only the wire format matters: field numbers and types. The messages are
described here, in a descriptor built at import into a pool of their own,
with only the fields flowport reads or writes (protobuf skips the others):

- request: `domain` (1), `descriptors` (2: each a list of `entries` (1), each
  `key` (1) and `value` (2)), `hits_addend` (3);
- response: `overall_code` (1: UNKNOWN 0, OK 1, OVER_LIMIT 2), `statuses`
  (2: each `code` (1), `current_limit` (2: `requests_per_unit` (1), `unit`
  (2: SECOND 1, MINUTE 2, HOUR 3, DAY 4)), `limit_remaining` (3),
  `duration_until_reset` (4: a Duration, `seconds` (1) and `nanos` (2))),
  `response_headers_to_add` (3: each `key` (1) and `value` (2)).

Describing them here, rather than installing a package of Envoy's whole
API, keeps flowport's dependencies small; that package also ships an old
copy of the `opentelemetry.proto` modules, which it installs over the
current ones the OTLP trace exporter needs.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE: Final = "envoy.service.ratelimit.v3.RateLimitService"
METHOD: Final = "ShouldRateLimit"
_PACKAGE = "flowport.internal.ratelimit"
_F = descriptor_pb2.FieldDescriptorProto

OK: Final = 1
OVER_LIMIT: Final = 2
SECOND: Final = 1
# Seconds in each Unit that has a whole number of them: a window of one of these is that unit.
UNITS: Final = {1: SECOND, 60: 2, 3600: 3, 86400: 4}


def _field(message: Any, name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "") -> None:
    field = message.field.add(name=name, number=number, type=kind)
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"


def _descriptor() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="flowport/internal/ratelimit.proto", package=_PACKAGE)
    file.syntax = "proto3"
    code = file.enum_type.add(name="Code")
    for name, number in (("UNKNOWN", 0), ("OK", OK), ("OVER_LIMIT", OVER_LIMIT)):
        code.value.add(name=name, number=number)
    unit = file.enum_type.add(name="Unit")
    for name, number in (("UNIT_UNKNOWN", 0), ("SECOND", SECOND), ("MINUTE", 2), ("HOUR", 3), ("DAY", 4)):
        unit.value.add(name=name, number=number)

    entry = file.message_type.add(name="Entry")
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_STRING)
    descriptor = file.message_type.add(name="Descriptor")
    _field(descriptor, "entries", 1, _F.TYPE_MESSAGE, repeated=True, type_name="Entry")
    request = file.message_type.add(name="RateLimitRequest")
    _field(request, "domain", 1, _F.TYPE_STRING)
    _field(request, "descriptors", 2, _F.TYPE_MESSAGE, repeated=True, type_name="Descriptor")
    _field(request, "hits_addend", 3, _F.TYPE_UINT32)

    limit = file.message_type.add(name="RateLimit")
    _field(limit, "requests_per_unit", 1, _F.TYPE_UINT32)
    _field(limit, "unit", 2, _F.TYPE_ENUM, type_name="Unit")
    duration = file.message_type.add(name="Duration")  # google.protobuf.Duration's wire form
    _field(duration, "seconds", 1, _F.TYPE_INT64)
    _field(duration, "nanos", 2, _F.TYPE_INT32)
    status = file.message_type.add(name="DescriptorStatus")
    _field(status, "code", 1, _F.TYPE_ENUM, type_name="Code")
    _field(status, "current_limit", 2, _F.TYPE_MESSAGE, type_name="RateLimit")
    _field(status, "limit_remaining", 3, _F.TYPE_UINT32)
    _field(status, "duration_until_reset", 4, _F.TYPE_MESSAGE, type_name="Duration")
    header = file.message_type.add(name="HeaderValue")
    _field(header, "key", 1, _F.TYPE_STRING)
    _field(header, "value", 2, _F.TYPE_STRING)
    response = file.message_type.add(name="RateLimitResponse")
    _field(response, "overall_code", 1, _F.TYPE_ENUM, type_name="Code")
    _field(response, "statuses", 2, _F.TYPE_MESSAGE, repeated=True, type_name="DescriptorStatus")
    _field(response, "response_headers_to_add", 3, _F.TYPE_MESSAGE, repeated=True, type_name="HeaderValue")
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_descriptor())
RateLimitRequest: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.RateLimitRequest"))
RateLimitResponse: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.RateLimitResponse"))
DescriptorStatus: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.DescriptorStatus"))
