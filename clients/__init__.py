"""flowport's Python SDK and the `flowport` command.

`Client` and `AsyncClient` carry a typed stub per service; `ApiError`
decodes a failed call's reason, metadata and field violations.
"""

from flowport.clients.client import AsyncClient, Client
from flowport.clients.errors import ApiError

__all__ = ["ApiError", "AsyncClient", "Client"]
