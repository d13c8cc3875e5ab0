"""What the server can tell about a call Envoy transcoded from REST.

Envoy's gRPC-JSON transcoder keeps the REST path it rewrote in the
`x-envoy-original-path` header (which Envoy strips from what clients send,
so a native gRPC call never carries it).
"""

from __future__ import annotations

from flowport.server.types import Context

ORIGINAL_PATH = "x-envoy-original-path"


def original_path(context: Context) -> str | None:
    """The REST path (without query) of a transcoded call; None for native gRPC."""
    for key, value in context.invocation_metadata() or ():
        if key == ORIGINAL_PATH and isinstance(value, str):
            return value.split("?", 1)[0]
    return None
