"""What the server can tell about a call Envoy transcoded from REST.

Envoy's gRPC-JSON transcoder keeps the REST path it rewrote in the
`x-envoy-original-path` header (which Envoy strips from what clients send,
so a native gRPC call never carries it), and passes the client's other
headers on as metadata, `accept` included.
"""

from __future__ import annotations

from flowport.server.auth.origin import peer_host
from flowport.server.types import Context

ORIGINAL_PATH = "x-envoy-original-path"
# Set by the WebSocket bridge (server/events/websocket.py) on the streams it opens.
TRANSPORT_HEADER = "x-flowport-transport"
LOOPBACK = frozenset({"127.0.0.1", "::1"})


def original_path(context: Context) -> str | None:
    """The REST path (without query) of a transcoded call; None for native gRPC."""
    for key, value in context.invocation_metadata() or ():
        if key == ORIGINAL_PATH and isinstance(value, str):
            return value.split("?", 1)[0]
    return None


def stream_transport(context: Context) -> str:
    """How a server stream reaches its client: `sse` or `ndjson` (REST through Envoy, told apart by
    `Accept: text/event-stream` as Envoy's stream routes are), `websocket` (the /ws bridge's stream,
    marked by it from loopback), else `grpc`."""
    rest = sse = websocket = False
    for key, value in context.invocation_metadata() or ():
        if key == ORIGINAL_PATH:
            rest = True
        elif key == "accept" and isinstance(value, str) and "text/event-stream" in value:
            sse = True
        elif key == TRANSPORT_HEADER and value == "websocket":
            websocket = True
    if websocket and not rest and _from_loopback(context):
        return "websocket"
    return ("sse" if sse else "ndjson") if rest else "grpc"


def _from_loopback(context: Context) -> bool:
    # Only the bridge in this process marks its calls; Envoy removes a client's copy of the header,
    # and a direct gRPC caller on another machine cannot pass for it.
    return peer_host(context.peer()) in LOOPBACK
