"""flowport's Python SDK and the `flowport` command.

`Client` and `AsyncClient` carry a typed stub per service, with the
credential, retries of calls safe to repeat, a default deadline and
`ApiError` (the gRPC code and the decoded status details) on every failure.
"""

from flowport.clients.client import AsyncClient, Client
from flowport.clients.errors import ApiError
from flowport.clients.values import plain

__all__ = ["ApiError", "AsyncClient", "Client", "plain"]
