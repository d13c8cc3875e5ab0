"""Envoy's own replies (404 unknown path, 400 bad query, 413, 429, 503,
504, …) for REST callers as JSON `google.rpc.Status` bodies, the same shape
the server's errors take.

Only REST requests get JSON: the edge filter marks them in dynamic metadata
(`flowport.rest`). Native gRPC and grpc-web callers keep gRPC's own local
replies, whose `grpc-message` must stay plain text. A request refused before
any filter ran (headers too large: 431, or malformed) has no mark; it gets
JSON unless its content-type says gRPC.

One gRPC local reply is rewritten too: limits that fail closed and cannot be
checked. Envoy answers a gRPC request with a trailers-only response made from
the rewritten reply (grpc-message: its body as plain text; the mapper's
headers as they are), so the mapper gives it the message and a
`grpc-status-details-bin` with the reason, as the server's own errors carry.
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

# HTTP status of a local reply -> google.rpc.Code it stands for.
STATUS_CODES = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    405: 12,  # UNIMPLEMENTED (method not allowed on this path)
    408: 4,  # DEADLINE_EXCEEDED
    413: 3,  # INVALID_ARGUMENT (request too large)
    431: 3,  # INVALID_ARGUMENT (request headers too large)
    429: 8,  # RESOURCE_EXHAUSTED
    500: 13,  # INTERNAL
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
REASONS = {
    # The transcoder's (an unknown query parameter, a path it cannot bind); its errors about
    # a body are rewritten by transcoder/body_fields.lua, with reasons of their own.
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    413: "REQUEST_TOO_LARGE",
    431: "REQUEST_HEADERS_TOO_LARGE",
    429: "RATE_LIMITED",
    503: "UPSTREAM_UNAVAILABLE",
    504: "UPSTREAM_TIMEOUT",
}
UNKNOWN = 2
# Tells transcoder/body_fields.lua which responses are Envoy's JSON replies:
# it cuts a long message (Envoy's text may quote the request whole) and drops this header.
LOCAL_REPLY_HEADER = "x-flowport-local-reply"
_MARK = {"header": {"key": LOCAL_REPLY_HEADER, "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}

_MARKED_REST = {
    "metadata_filter": {
        "matcher": {"filter": "flowport", "path": [{"key": "rest"}], "value": {"bool_match": True}},
        "match_if_key_not_found": False,
    }
}
# The edge filter never ran: the mark is absent (it is only ever set to true).
_UNMARKED = {
    "metadata_filter": {
        "matcher": {"filter": "flowport", "path": [{"key": "rest"}], "value": {"bool_match": False}},
        "match_if_key_not_found": True,
    }
}
_NOT_GRPC = {
    "header_filter": {
        "header": {
            "name": "content-type",
            "string_match": {"prefix": "application/grpc"},
            "invert_match": True,
            "treat_missing_header_as_empty": True,
        }
    }
}
_GRPC = {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}}}
# A reply already written as a JSON google.rpc.Status (transcoder/body_fields.lua) is left as is.
_NOT_WRITTEN = {
    "metadata_filter": {
        "matcher": {"filter": "flowport", "path": [{"key": "json_reply"}], "value": {"bool_match": False}},
        "match_if_key_not_found": True,
    }
}
_IS_REST = {
    "and_filter": {
        "filters": [
            {"or_filter": {"filters": [_MARKED_REST, {"and_filter": {"filters": [_UNMARKED, _NOT_GRPC]}}]}},
            _NOT_WRITTEN,
        ]
    }
}


def _status_filter(op: str, status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": op,
                "value": {"default_value": status, "runtime_key": f"flowport.local_reply.{status}"},
            }
        }
    }


def _body(code: int, reason: str) -> dict[str, Any]:
    status: dict[str, Any] = {"code": code, "message": "%LOCAL_REPLY_BODY%"}
    if reason:
        status["details"] = [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "envoy.flowport.dev"}
        ]
    return {"json_format": status, "content_type": "application/json"}


# The rate limit service failed (its counters unreachable) and limits fail closed: Envoy's
# reply says nothing, so the message is written here.
_RATE_LIMIT_UNAVAILABLE_MESSAGE = "rate limits cannot be checked right now (their counters are unavailable); try again"
_RATE_LIMITS_FAILED = {"response_flag_filter": {"flags": ["RLSE"]}}
_RATE_LIMIT_UNAVAILABLE_INFO = {"reason": "RATE_LIMIT_UNAVAILABLE", "domain": "envoy.flowport.dev"}
_RATE_LIMIT_UNAVAILABLE = {
    "filter": {"and_filter": {"filters": [_RATE_LIMITS_FAILED, _IS_REST]}},
    "body_format_override": {
        "json_format": {
            "code": 14,
            "message": _RATE_LIMIT_UNAVAILABLE_MESSAGE,
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", **_RATE_LIMIT_UNAVAILABLE_INFO}],
        },
        "content_type": "application/json",
    },
    "headers_to_add": [_MARK],
}


def grpc_status_details(code: int, message: str, reason: str, domain: str) -> str:
    """`grpc-status-details-bin` of a google.rpc.Status with one ErrorInfo: base64, as gRPC
    carries a -bin header on the wire (unpadded, as it should emit them); Envoy sends a header
    value as it is written."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain))
    status = status_pb2.Status(code=code, message=message, details=[detail])
    return base64.b64encode(status.SerializeToString()).decode("ascii").rstrip("=")


def _rate_limit_unavailable_grpc() -> dict[str, Any]:
    """The same refusal for gRPC callers (UNAVAILABLE from the 503): the body is their
    grpc-message, the details their grpc-status-details-bin."""
    details = grpc_status_details(14, _RATE_LIMIT_UNAVAILABLE_MESSAGE, **_RATE_LIMIT_UNAVAILABLE_INFO)
    return {
        "filter": {"and_filter": {"filters": [_RATE_LIMITS_FAILED, _UNMARKED, _GRPC]}},
        "body_format_override": {"text_format_source": {"inline_string": _RATE_LIMIT_UNAVAILABLE_MESSAGE}},
        "headers_to_add": [
            {
                "header": {"key": "grpc-status-details-bin", "value": details},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def local_reply_config() -> dict[str, Any]:
    """`local_reply_config` for the HTTP connection manager."""
    mappers = [_RATE_LIMIT_UNAVAILABLE, _rate_limit_unavailable_grpc()]
    mappers += [
        {
            "filter": {"and_filter": {"filters": [_status_filter("EQ", status), _IS_REST]}},
            "body_format_override": _body(code, REASONS.get(status, "")),
            "headers_to_add": [_MARK],
        }
        for status, code in STATUS_CODES.items()
    ]
    mappers.append(
        {
            "filter": {"and_filter": {"filters": [_status_filter("GE", 400), _IS_REST]}},
            "body_format_override": _body(UNKNOWN, ""),
            "headers_to_add": [_MARK],
        }
    )
    return {"mappers": mappers}
