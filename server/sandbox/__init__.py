"""Sandboxed execution of user Python code in warm worker processes.

The pool is imported lazily: the worker process imports this package too, and
must not load asyncio (which brings subprocess and socket, whose native parts
act without audit events) into the process where user code runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowport.server.sandbox.errors import (
    SandboxCrashed,
    SandboxError,
    SandboxMemoryError,
    SandboxPolicyViolation,
    SandboxTimeout,
    UserCodeError,
)

if TYPE_CHECKING:
    from flowport.server.sandbox.pool import SandboxLimits, SandboxPool, SandboxStats

__all__ = [
    "SandboxCrashed",
    "SandboxError",
    "SandboxLimits",
    "SandboxMemoryError",
    "SandboxPolicyViolation",
    "SandboxPool",
    "SandboxStats",
    "SandboxTimeout",
    "UserCodeError",
]

_FROM_POOL = frozenset({"SandboxLimits", "SandboxPool", "SandboxStats"})


def __getattr__(name: str) -> Any:
    if name in _FROM_POOL:
        from flowport.server.sandbox import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
