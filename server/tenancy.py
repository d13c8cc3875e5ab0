"""Which tenant a call acts for.

Authentication is not built yet, so every call acts for tenant `default`.
UNFINISHED: the security issue replaces this with the authenticated
principal's tenant; the store already scopes every read and write by it.
"""

from __future__ import annotations

from flowport.server.types import Context

DEFAULT_TENANT = "default"


def tenant_of(context: Context) -> str:
    """The tenant the call acts for."""
    return DEFAULT_TENANT
