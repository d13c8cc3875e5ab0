"""Envoy's own replies (404 unknown path, 400 bad query, 413, 429, 503,
504, …) for REST callers as JSON `google.rpc.Status` bodies, the same shape
the server's errors take.

Only REST requests get JSON: the edge filter marks them in dynamic metadata
(`flowport.rest`). Native gRPC and grpc-web callers keep gRPC's own local
replies, whose `grpc-message` must stay plain text.
"""

from __future__ import annotations

from typing import Any

# HTTP status of a local reply -> google.rpc.Code it stands for.
STATUS_CODES = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    405: 12,  # UNIMPLEMENTED (method not allowed on this path)
    408: 4,  # DEADLINE_EXCEEDED
    413: 3,  # INVALID_ARGUMENT (request too large)
    429: 8,  # RESOURCE_EXHAUSTED
    500: 13,  # INTERNAL
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
REASONS = {
    404: "NOT_FOUND",
    413: "REQUEST_TOO_LARGE",
    429: "RATE_LIMITED",
    503: "UPSTREAM_UNAVAILABLE",
    504: "UPSTREAM_TIMEOUT",
}
UNKNOWN = 2

_IS_REST = {
    "metadata_filter": {
        "matcher": {"filter": "flowport", "path": [{"key": "rest"}], "value": {"bool_match": True}},
        "match_if_key_not_found": False,
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


def local_reply_config() -> dict[str, Any]:
    """`local_reply_config` for the HTTP connection manager."""
    mappers = [
        {
            "filter": {"and_filter": {"filters": [_status_filter("EQ", status), _IS_REST]}},
            "body_format_override": _body(code, REASONS.get(status, "")),
        }
        for status, code in STATUS_CODES.items()
    ]
    mappers.append(
        {
            "filter": {"and_filter": {"filters": [_status_filter("GE", 400), _IS_REST]}},
            "body_format_override": _body(UNKNOWN, ""),
        }
    )
    return {"mappers": mappers}
