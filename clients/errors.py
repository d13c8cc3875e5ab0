"""One exception for every failed call: the gRPC code and the decoded `google.rpc.Status`.

`Client` and `AsyncClient` raise `ApiError` for every call that fails,
unary or streaming, sync or async. It is a `grpc.aio.AioRpcError` (so a
`grpc.RpcError`) with the methods of a failed call (`code()`, `details()`,
`trailing_metadata()`), so code written against plain grpc, sync or async,
keeps working, plus what flowport's status details say: `reason` and `domain` (ErrorInfo), `metadata`, the field
`violations` (BadRequest) and `retry_delay` in seconds (RetryInfo).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ApiError(grpc.aio.AioRpcError):
    """A flowport call that failed, with its status details decoded."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        status: status_pb2.Status | None = None,
        trailers: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), message, None)
        self._code = code
        self._message = message
        self.message = message
        self.status = status or status_pb2.Status(code=code.value[0], message=message)
        self.reason = ""
        self.domain = ""
        self.metadata: dict[str, str] = {}
        self.violations: list[tuple[str, str]] = []
        self.retry_delay: float | None = None
        for detail in self.status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                self.reason, self.domain, self.metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Unpack(bad):
                self.violations = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(retry):
                self.retry_delay = retry.retry_delay.ToTimedelta().total_seconds()

    def __str__(self) -> str:
        where = f" [{self.reason}]" if self.reason else ""
        fields = "; ".join(f"{field}: {why}" for field, why in self.violations)
        return f"{self._code.name}: {self._message}{where}" + (f" ({fields})" if fields else "")

    def __repr__(self) -> str:
        return f"ApiError({self._code.name}, {self._message!r}, reason={self.reason!r})"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ApiError:
        """Decode `error` as raised by a plain grpc stub, sync or async (an ApiError is returned as is)."""
        if isinstance(error, ApiError):
            return error
        call = error if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
        code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
        message = (call.details() if call is not None else str(error)) or ""
        trailers = tuple(call.trailing_metadata() or ()) if call is not None else ()
        status = None
        for key, value in trailers:
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
        return cls(code or grpc.StatusCode.UNKNOWN, message, status=status, trailers=trailers)
