"""Decode a failed call's `google.rpc.Status` into a typed error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class ApiError(Exception):
    """A flowport call that failed, with the status details decoded."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)
    retry_delay: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ApiError:
        """Decode `error` (as raised by a stub, sync or async)."""
        call = error if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
        code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
        message = (call.details() if call is not None else str(error)) or ""
        result = cls(code=code, message=message)
        trailers: Any = call.trailing_metadata() if call is not None else None
        for key, value in trailers or ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                result._read_status(status_pb2.Status.FromString(value))
        return result

    def _read_status(self, status: status_pb2.Status) -> None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                self.reason, self.domain, self.metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Unpack(bad):
                self.violations = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(retry):
                self.retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
