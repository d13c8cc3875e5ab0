"""Why a sandboxed run failed: one exception per cause, each with a machine `reason`."""

from __future__ import annotations


class SandboxError(Exception):
    """Root of every sandbox failure. `message` is for people, `reason` for machines."""

    default_reason = "SANDBOX_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class UserCodeError(SandboxError):
    """The code raised, did not compile, or produced a result that is not JSON."""

    default_reason = "USER_CODE_ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, error_type: str | None = None, line: int | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        # The Python exception class name (e.g. "ZeroDivisionError") and the
        # line of the user's code it came from, when known.
        self.error_type = error_type
        self.line = line


class SandboxPolicyViolation(SandboxError):
    """The code tried something the sandbox refuses (files, network, processes, imports)."""

    default_reason = "SANDBOX_POLICY"


class SandboxTimeout(SandboxError):
    """The run exceeded its CPU time or wall-clock limit; `limit` says which."""

    default_reason = "SANDBOX_TIMEOUT"

    def __init__(self, message: str, *, limit: str, seconds: float) -> None:
        super().__init__(message)
        self.limit = limit  # "cpu" or "wall"
        self.seconds = seconds


class SandboxMemoryError(SandboxError):
    """The run exceeded the worker's memory limit."""

    default_reason = "SANDBOX_MEMORY"


class SandboxCrashed(SandboxError):
    """The worker process died (signal or exit) or broke the protocol while running the code."""

    default_reason = "SANDBOX_CRASHED"
