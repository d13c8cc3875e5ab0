"""The principal of the call being handled, set by the interceptor."""

from __future__ import annotations

from contextvars import ContextVar

from flowport.server.auth.principal import Principal

# Each RPC runs in its own task, so a value set for one call never leaks
# into another.
CURRENT: ContextVar[Principal | None] = ContextVar("flowport_principal", default=None)
