"""The seed's WebSocket endpoint (`/ws` through Envoy), served from the native event stream.

Each connection opens `EventService.StreamEvents` on this process's own gRPC
port with the credential headers Envoy passed on (`x-api-key`,
`authorization`) and the query's `session_id`, `workflow_id`,
`execution_id`, `types`, `event_types` and `after_id`: authentication,
tenants, session visibility and filtering are the stream's, not a second
copy of them. The stream is opened during the handshake, and the upgrade
happens only once it has started: a handshake without any credential, with
a wrong one, or for a session the credential may not use is refused before
the upgrade with the HTTP status and JSON `google.rpc.Status` that
`GET /events` gives (401, 404 `SESSION_NOT_FOUND`, ...), as Kailash's
server refuses its handshakes. Two refusals come before any stream: a
request without `upgrade: websocket` (426), and a handshake beyond those
allowed to wait for theirs (503 with Retry-After): MAX_PENDING_PER_CLIENT
from one client address (an IPv6 one's /64), MAX_PENDING_HANDSHAKES of addresses without a
recent 401, MAX_PENDING_FAILING of addresses with one. The server answers
an address's repeated failures more and more slowly, and a handshake waits
through that stall: apart, and few per address, such handshakes cannot take
the places every other client's handshake needs.

Frames are the events (heartbeats left out) as proto3 JSON with the proto
field names, plus `event` (the same object again) and `timestamp` (unix
seconds), so the seed's `data.type` / `data.workflow_id` / `data.error` and
Kailash's `{"event": {...}, "timestamp": ...}` both read them. Without
types the stream asks for every event and the Kailash-named copies.

Client messages: `{"type": "subscribe", "events": [...]}` (or
`event_types`) replaces the types, resuming after the last event sent so
nothing is lost or repeated, and is answered `{"type": "subscribed",
"events": [...]}`; `ping` and `{"type": "ping"}` get a pong; other text that
is not JSON (`Hello`) is echoed as `Echo: Hello`, as Kailash's workflow
servers do (up to MAX_ECHO_CHARS: a reply is its message plus the 6
characters of `Echo: `, and neither is logged); anything else an error
frame, the connection staying open (so does an 11th subscription within
10 s, refused). A stream error after the upgrade (a key revoked meanwhile) is an
error frame `{"type": "error", "error": ..., "code": "<gRPC code>"}`, then a
close: 1008 for credentials, permissions and missing sessions, 1003 for bad
input, 1013 when trying again later may work (the stream fell behind, the
server is stopping), 1011 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qsl

import grpc
import orjson
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2, status_pb2
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from flowport.server.auth.authenticator import FAILURE_WINDOW, MAX_DELAY, TRACKED_CLIENTS
from flowport.server.auth.origin import TrustedProxies
from flowport.server.errors import shown
from flowport.server.events.kailash import KAILASH_DEFAULT, NATIVE_TYPES
from flowport.server.events.numbers import whole_numbers
from flowport.server.events.types import MAX_TYPES
from flowport.server.transcoding import TRANSPORT_HEADER
from flowport.v1 import event_pb2, event_pb2_grpc

log = logging.getLogger("flowport.server.websocket")
# websockets logs every connection and refused handshake (Envoy's health checks too) at INFO.
_protocol_log = logging.getLogger("flowport.server.websocket.protocol")
_protocol_log.setLevel(logging.WARNING)

PATH: Final = "/ws"
HEALTH_PATH: Final = "/healthz"
TRANSPORT: Final = "websocket"  # in TRANSPORT_HEADER: the stats count the bridge's streams apart
MAX_MESSAGE_BYTES: Final = 64 * 2**10  # a client message; a subscription is far smaller
MAX_TYPE_CHARS: Final = 200
# Each subscription restarts the stream (a replay from the log): at most this many per window,
# since messages on an open connection pass no rate limit of Envoy's.
SUBSCRIBE_BURST: Final = 10
SUBSCRIBE_WINDOW: Final = 10.0
# Any client message (a ping, text to echo, a subscription): a bucket of MESSAGE_BURST, refilled
# MESSAGE_RATE a second. Past it the connection is closed (1008): each message costs the event
# loop every tenant shares a parse and an answer, and pass no rate limit of Envoy's.
MESSAGE_RATE: Final = 10.0
MESSAGE_BURST: Final = 50
POLICY_CLOSE: Final = 1008
HEARTBEAT: Final = "heartbeat"
CREDENTIALS: Final = ("x-api-key", "authorization")
# Headers the stream needs as the client sent them through Envoy.
FORWARDED: Final = (*CREDENTIALS, "x-flowport-act-as-tenant", "x-request-id")
SINGLE: Final = ("session_id", "workflow_id", "execution_id", "after_id", "user_id")
REPEATED: Final = ("types", "event_types")
# No types: every flowport event and the underscore-named Kailash copies (what the seed's clients read).
EVERY_TYPE: Final = (*sorted(NATIVE_TYPES - {HEARTBEAT}), *KAILASH_DEFAULT)
# Close codes (RFC 6455 §7.4.1) by the stream's gRPC status; anything else is 1011.
CLOSE_CODES: Final = {
    grpc.StatusCode.UNAUTHENTICATED: 1008,
    grpc.StatusCode.PERMISSION_DENIED: 1008,
    grpc.StatusCode.NOT_FOUND: 1008,
    grpc.StatusCode.INVALID_ARGUMENT: 1003,
    grpc.StatusCode.OUT_OF_RANGE: 1003,
    grpc.StatusCode.ABORTED: 1013,
    grpc.StatusCode.UNAVAILABLE: 1013,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 1013,
}
INTERNAL_CLOSE: Final = 1011
# HTTP status of a handshake refused by the stream's gRPC status (as Envoy transcodes it for /events).
REFUSALS: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ABORTED: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
# How long the handshake waits for the stream to start (its first heartbeat comes once its checks
# pass). A wrong credential from an address that keeps failing is answered UNAUTHENTICATED only after
# the authenticator's stall (up to MAX_DELAY): waiting less turns that 401 into a 503, which
# reconnecting clients retry for ever. The margin is for the stream's own start; the sum stays under
# websockets' open_timeout (10 s), which would drop the handshake unanswered.
OPEN_TIMEOUT: Final = MAX_DELAY + 2.0
# Handshakes waiting for their stream at once. Each holds a connection, a stream on the bridge's one
# gRPC channel and the server's checks for up to OPEN_TIMEOUT; past these, more are refused at once
# with 503 and Retry-After instead of joining the wait. A client address is the server's (Envoy's
# x-forwarded-for from a trusted proxy, else the peer's), so the server's stall of that address's
# failed logins and these places are counted for the same client:
# - at most MAX_PENDING_PER_CLIENT from one address, whichever pool they wait in;
# - MAX_PENDING_HANDSHAKES places for addresses without a recent failure;
# - MAX_PENDING_FAILING places apart for addresses the server refused a handshake of with 401 within
#   FAILURE_WINDOW (the ones it stalls, up to MAX_DELAY each): a flood of wrong keys, from one address
#   or many, waits there and never takes the places of the others. A handshake that upgrades clears
#   its address (a mistyped key, then the right one).
MAX_PENDING_HANDSHAKES: Final = 256
# Text frames kept for the bridge's connections (Frames): the events of the last moments.
MAX_FRAMES: Final = 1024
MAX_PENDING_FAILING: Final = 128
MAX_PENDING_PER_CLIENT: Final = 16
RETRY_AFTER_SECONDS: Final = 1
# Text echoed back at most (a greeting, not a transfer): longer text gets an error frame.
MAX_ECHO_CHARS: Final = 4096
ECHO_PREFIX: Final = "Echo: "
STATUS_DETAILS: Final = "grpc-status-details-bin"
_ = error_details_pb2  # registers ErrorInfo and BadRequest, so a refusal's details print as JSON


class BadHandshake(ValueError):
    """The upgrade request's query or headers cannot make a stream; the message names the part."""


@dataclass(frozen=True, slots=True)
class StreamQuery:
    """What one connection streams: the query's filters and the types asked for last."""

    filters: dict[str, str] = field(default_factory=dict)
    types: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()

    def request(self, after_id: str) -> event_pb2.StreamEventsRequest:
        types = self.types if self.types or self.event_types else EVERY_TYPE
        return event_pb2.StreamEventsRequest(
            **self.filters, types=types, event_types=self.event_types, after_id=after_id
        )


def parse_query(query: str) -> tuple[StreamQuery, str]:
    """The subscription and `after_id` of a `/ws?...` query; BadHandshake names an unknown or repeated parameter."""
    filters: dict[str, str] = {}
    repeated: dict[str, list[str]] = {name: [] for name in REPEATED}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in REPEATED:
            repeated[name].append(value)
        elif name not in SINGLE:
            raise BadHandshake(f"unknown query parameter {shown(name)}")
        elif name in filters:
            raise BadHandshake(f"query parameter {name} given twice")
        else:
            filters[name] = value
    after = filters.pop("after_id", "")
    types = tuple(t for t in repeated["types"] if t)
    return StreamQuery(filters, types, tuple(t for t in repeated["event_types"] if t)), after


def subscribed_types(message: dict[str, Any]) -> list[str]:
    """The `events` (or `event_types`) of a subscribe message; ValueError says what is wrong."""
    key = "events" if "events" in message else "event_types"
    names = message.get(key, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key} must be a list of event type names")
    if len(names) > MAX_TYPES:
        raise ValueError(f"{key}: at most {MAX_TYPES} types")
    for name in names:
        if not name or len(name) > MAX_TYPE_CHARS or not name.isprintable():
            raise ValueError(f"{key}: {shown(name)} is not an event type name")
    return list(dict.fromkeys(names))


def frame(event: event_pb2.Event) -> str:
    """An event as the text frame clients read: its JSON, plus `event` (the same) and `timestamp`."""
    body = MessageToDict(event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if "data" in body:
        body["data"] = whole_numbers(body["data"])
    timestamp = event.time.seconds + event.time.nanos / 1e9
    return orjson.dumps({**body, "event": body, "timestamp": timestamp}).decode()


class Frames:
    """The text frames of the newest MAX_FRAMES events, shared by the connections of one bridge:
    each connection gets its own copy of an event from its stream, and writing one out is about
    ten times the work of sending it (a tenant's hundreds of `/ws` clients each wrote theirs)."""

    def __init__(self) -> None:
        self._made: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def of(self, event: event_pb2.Event) -> str:
        # An event's id names it within this server's bus; a Kailash copy shares it, with its own type.
        key = (event.tenant, event.id, event.type)
        text = self._made.get(key)
        if text is None:
            text = self._made[key] = frame(event)
            if len(self._made) > MAX_FRAMES:
                self._made.popitem(last=False)
        return text


def _error(message: str, code: str = "") -> str:
    return orjson.dumps({"type": "error", "error": message, **({"code": code} if code else {})}).decode()


def counted_as(address: str) -> str:
    """The client a handshake counts against: an IPv4 address itself, an IPv6 one its /64 (one
    customer's network hands out a /64 or more, so counting its addresses apart would give one
    client 2**64 times the places), an IPv4-mapped one the IPv4 address; anything else as given."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def _printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


def echo(message: str) -> str:
    """The answer to text that is not JSON: `Echo: <text>` (Kailash's servers' /ws), or an error
    frame for text too long to echo, which quotes none of it."""
    if len(message) > MAX_ECHO_CHARS:
        return _error(f"not JSON, and too long to echo (at most {MAX_ECHO_CHARS} characters)")
    return ECHO_PREFIX + message


def refusal_body(error: grpc.aio.AioRpcError) -> str:
    """The stream's error as the JSON `google.rpc.Status` REST callers get: the server's own
    status (reason and field violations) when it sent one, else its code and message."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS and isinstance(value, bytes):
            with contextlib.suppress(Exception):  # a status that does not parse falls back to code and message
                status = status_pb2.Status.FromString(value)
                return orjson.dumps(MessageToDict(status, preserving_proto_field_name=True)).decode()
    code = error.code()
    number = code.value[0] if isinstance(code.value, tuple) else 2
    return orjson.dumps({"code": number, "message": error.details() or code.name, "details": []}).decode()


@dataclass(slots=True)
class _Opened:
    """A stream opened during a handshake, for the connection once upgraded."""

    call: grpc.aio.UnaryStreamCall[event_pb2.StreamEventsRequest, event_pb2.Event]
    first: event_pb2.Event  # its first message, read to know it started (a heartbeat)
    subscription: StreamQuery
    after: str
    resume_from: str
    watch: asyncio.Task[None] | None = None  # cancels the stream if the connection ends before the handler


class WebSocketBridge:
    """Serves `/ws` on its own port; `connections` is how many are open now."""

    def __init__(
        self,
        grpc_target: str,
        *,
        require_credential: bool,
        trusted_proxies: TrustedProxies,
        head: Callable[[], int] | None = None,
        ping_interval: float = 20.0,
        max_pending: int = MAX_PENDING_HANDSHAKES,
        max_pending_failing: int = MAX_PENDING_FAILING,
        max_pending_per_client: int = MAX_PENDING_PER_CLIENT,
    ) -> None:
        self.connections = 0
        # Handshakes waiting for their stream to start, by whether their address was refused with 401
        # lately (False: the MAX_PENDING_HANDSHAKES places, True: the MAX_PENDING_FAILING ones), and by
        # address (no entry at 0: at most one per waiting handshake).
        self._pending = {False: 0, True: 0}
        self._max_pending = {False: max_pending, True: max_pending_failing}
        self._pending_by_client: dict[str, int] = {}
        self._max_per_client = max_pending_per_client
        # Addresses refused with 401 within FAILURE_WINDOW, by when last (oldest first, at most TRACKED_CLIENTS).
        self._failed: OrderedDict[str, float] = OrderedDict()
        self._target = grpc_target
        self._require_credential = require_credential
        self._trusted = trusted_proxies
        # The newest event id: where a resubscription resumes when nothing was sent yet.
        self._head = head
        self._ping_interval = ping_interval
        self._server: Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: event_pb2_grpc.EventServiceAsyncStub | None = None
        # Streams opened by handshakes whose connection has not reached the handler yet. An entry
        # leaves when the handler takes it, or with its stream cancelled when the handshake ends
        # without an upgrade (_answered) or the connection ends first (_cancel_when_lost).
        self._opened: dict[ServerConnection, _Opened] = {}
        self._frames = Frames()
        # Set when the server drains: Envoy's health check then takes this bridge out
        # of rotation too, and new /ws connections go to another server.
        self.draining = False

    @property
    def port(self) -> int:
        """The port it listens on (the one asked for, or the one the system chose for 0)."""
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; OSError when it cannot."""
        self._channel = grpc.aio.insecure_channel(self._target)
        self._stub = event_pb2_grpc.EventServiceStub(self._channel)
        try:
            self._server = await serve(
                self._serve,
                host,
                port,
                process_request=self._check,
                process_response=self._answered,
                max_size=MAX_MESSAGE_BYTES,
                max_queue=16,
                # Pings keep Envoy's stream idle timeout from cutting a quiet connection and find dead clients.
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                logger=_protocol_log,
            )
        except OSError:
            await self._channel.close()
            raise

    async def stop(self) -> None:
        """Close every connection (1001, going away) and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for connection in list(self._opened):
            self._drop(connection)
        if self._channel is not None:
            await self._channel.close()

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer health checks and refuse what cannot become a stream, before the upgrade."""
        path, _, query = request.path.partition("?")
        if path == HEALTH_PATH and "upgrade" not in request.headers:
            if self.draining:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path != PATH:
            return _refuse(connection, HTTPStatus.NOT_FOUND, 5, f"no WebSocket endpoint at {shown(path)}")
        # websockets checks the upgrade only after this returns: a plain GET would open a stream first.
        if not _asks_websocket(request):
            response = _refuse(
                connection, HTTPStatus.UPGRADE_REQUIRED, 3, "not a WebSocket handshake: send upgrade: websocket"
            )
            response.headers["Upgrade"] = "websocket"
            return response
        try:
            subscription, after = parse_query(query)
            for name in FORWARDED:
                if not all(_printable_ascii(v) for v in request.headers.get_all(name)):
                    raise BadHandshake(f"header {name} must be printable ASCII")
        except BadHandshake as exc:
            return _refuse(connection, HTTPStatus.BAD_REQUEST, 3, str(exc))
        if self._require_credential and not any(request.headers.get_all(h) for h in CREDENTIALS):
            return _refuse(
                connection,
                HTTPStatus.UNAUTHORIZED,
                16,
                "no credential: send x-api-key or authorization (or ?access_token=, or the flowport_token cookie)",
            )
        forwarded, client = self._addresses(connection, request)
        failing = self._failed_lately(client)
        waiting = self._pending_by_client.get(client, 0)
        if waiting >= self._max_per_client:
            most = self._max_per_client
            return _busy(connection, f"too many WebSocket handshakes waiting from one address (at most {most})")
        if self._pending[failing] >= self._max_pending[failing]:
            most = self._max_pending[failing]
            return _busy(connection, f"too many WebSocket handshakes waiting (at most {most})")
        self._pending[failing] += 1
        self._pending_by_client[client] = waiting + 1
        try:
            answer = await self._open(connection, request, subscription, after, forwarded)
        finally:
            self._pending[failing] -= 1
            left = self._pending_by_client.pop(client) - 1
            if left:
                self._pending_by_client[client] = left
        if answer is None:
            self._failed.pop(client, None)
        elif answer.status_code == HTTPStatus.UNAUTHORIZED:
            self._failed.pop(client, None)
            self._failed[client] = time.monotonic()
            while len(self._failed) > TRACKED_CLIENTS:
                self._failed.popitem(last=False)
        return answer

    def _failed_lately(self, client: str) -> bool:
        """Whether a handshake from `client` was refused with 401 within FAILURE_WINDOW."""
        when = self._failed.get(client)
        if when is None:
            return False
        if time.monotonic() - when < FAILURE_WINDOW:
            return True
        del self._failed[client]
        return False

    async def _open(
        self, connection: ServerConnection, request: Request, subscription: StreamQuery, after: str, forwarded: str
    ) -> Response | None:
        """Start the stream, and refuse the handshake as `GET /events` would when it does not
        start (a wrong credential, another's session); else keep it for the connection."""
        assert self._stub is not None
        resume_from = str(self._head()) if self._head is not None and not after else after
        call = self._stub.StreamEvents(subscription.request(after), metadata=self._metadata(request, forwarded))
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                # The stream's first message is a heartbeat, sent once its checks have passed.
                first = await call.read()
        except grpc.aio.AioRpcError as exc:
            status = REFUSALS.get(exc.code(), HTTPStatus.INTERNAL_SERVER_ERROR)
            return _respond(connection, status, refusal_body(exc))
        except TimeoutError:
            call.cancel()
            # The server took the call and did not answer: a timeout, not a server that is away
            # (Envoy retries neither; a client may).
            return _refuse(
                connection, HTTPStatus.GATEWAY_TIMEOUT, 4, f"the event stream did not start within {OPEN_TIMEOUT:g} s"
            )
        except BaseException:
            call.cancel()
            raise
        if not isinstance(first, event_pb2.Event):  # EOF: the server is stopping
            return _refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, 14, "the event stream ended")
        opened = _Opened(call, first, subscription, after, resume_from)
        self._opened[connection] = opened
        opened.watch = asyncio.create_task(self._cancel_when_lost(connection))
        return None

    async def _cancel_when_lost(self, connection: ServerConnection) -> None:
        """Cancel the stream of a handshake whose connection ends before the handler takes it (the
        client left during the handshake, or the server began closing after _answered saw 101)."""
        await connection.wait_closed()
        opened = self._opened.pop(connection, None)
        if opened is not None:
            opened.call.cancel()

    def _drop(self, connection: ServerConnection) -> None:
        """Cancel the stream kept for `connection`, and its watch, if there is one."""
        opened = self._opened.pop(connection, None)
        if opened is not None:
            opened.call.cancel()
            if opened.watch is not None:
                opened.watch.cancel()

    def _answered(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """Drop the stream of a handshake that ends without an upgrade after all."""
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            self._drop(connection)

    def _addresses(self, connection: ServerConnection, request: Request) -> tuple[str, str]:
        """The `x-forwarded-for` passed on to the server, and the client the limits on waiting
        handshakes count by. The address is, from a trusted proxy, the header's last entry (origin_of's,
        the one Envoy appends, never what the client claimed before it), passed on alone; else the
        peer. It is counted as itself, or an IPv6 one as its /64 (counted_as)."""
        peer = str(connection.remote_address[0]) if connection.remote_address else ""
        # Envoy sends one header; a trusted peer calling the port directly may send several.
        forwarded = ", ".join(request.headers.get_all("x-forwarded-for"))
        # The server trusts the bridge's loopback address: pass on a client address only from a
        # trusted proxy, and only the one it added (what a client claimed before it, however odd,
        # neither moves the count to the proxy's address nor reaches the server).
        client = forwarded.rsplit(",", 1)[-1].strip() if peer in self._trusted else ""
        if not (client and _printable_ascii(client)):
            client = peer
        return client, counted_as(client)

    def _metadata(self, request: Request, forwarded: str) -> list[tuple[str, str]]:
        metadata = [(name, value) for name in FORWARDED for value in request.headers.get_all(name)]
        if forwarded:
            metadata.append(("x-forwarded-for", forwarded))
        metadata.append((TRANSPORT_HEADER, TRANSPORT))
        return metadata

    async def _serve(self, connection: ServerConnection) -> None:
        assert self._stub is not None and connection.request is not None
        opened = self._opened.pop(connection, None)
        if opened is None:  # the handshake opens one for every upgrade; never without
            await connection.close(INTERNAL_CLOSE)
            return
        if opened.watch is not None:  # the link cancels the stream from here on
            opened.watch.cancel()
        self.connections += 1
        try:
            metadata = self._metadata(connection.request, self._addresses(connection, connection.request)[0])
            link = _Link(connection, self._stub, metadata, opened.subscription, self._frames)
            await link.run(opened)
        finally:
            self.connections -= 1


def _asks_websocket(request: Request) -> bool:
    """Whether the request asks for the WebSocket upgrade (`upgrade: websocket`, in any case)."""
    tokens = (token.strip().lower() for value in request.headers.get_all("upgrade") for token in value.split(","))
    return "websocket" in tokens


def _busy(connection: ServerConnection, message: str) -> Response:
    """A 503 UNAVAILABLE with Retry-After for a handshake that may not wait now."""
    response = _refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, 14, f"{message}: try again shortly")
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _refuse(connection: ServerConnection, status: HTTPStatus, code: int, message: str) -> Response:
    return _respond(connection, status, orjson.dumps({"code": code, "message": message, "details": []}).decode())


def _respond(connection: ServerConnection, status: HTTPStatus, body: str) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


class _Link:
    """One client connection and the upstream stream that feeds it."""

    def __init__(
        self,
        connection: ServerConnection,
        stub: event_pb2_grpc.EventServiceAsyncStub,
        metadata: Sequence[tuple[str, str]],
        subscription: StreamQuery,
        frames: Frames,
    ) -> None:
        self._ws = connection
        self._frames = frames
        self._stub = stub
        self._metadata = tuple(metadata)
        self._subscription = subscription
        self._sent = ""  # id of the last event sent
        self._resume_from = ""
        self._pump: asyncio.Task[None] | None = None
        self._subscribed: deque[float] = deque(maxlen=SUBSCRIBE_BURST)  # when the last ones were
        self._tokens = float(MESSAGE_BURST)
        self._refilled = time.monotonic()

    async def run(self, opened: _Opened) -> None:
        """Forward the stream the handshake opened until either side ends."""
        self._sent = opened.after
        # Where a resubscription resumes before any event was sent.
        self._resume_from = opened.resume_from
        self._pump = asyncio.create_task(self._forward(opened.call, opened.first))
        try:
            async for message in self._ws:
                if not self._take_token():
                    await self._refuse_flood()
                    break
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._stop_pump()

    async def _refuse_flood(self) -> None:
        """Close the connection (1008) after an error frame. What the client still sends is read and
        dropped meanwhile: unread, it would hold back its answer to the close for close_timeout."""
        limit = f"more than {MESSAGE_RATE:g} messages a second (bursts of {MESSAGE_BURST})"
        closing = asyncio.ensure_future(self._close(POLICY_CLOSE, _error(limit, "RESOURCE_EXHAUSTED")))
        with contextlib.suppress(ConnectionClosed):
            async for _ in self._ws:
                pass
        await closing

    def _take_token(self) -> bool:
        """Whether the client may send this message: one token of its bucket."""
        now = time.monotonic()
        self._tokens = min(float(MESSAGE_BURST), self._tokens + (now - self._refilled) * MESSAGE_RATE)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None

    def _start_pump(self, request: event_pb2.StreamEventsRequest) -> asyncio.Task[None]:
        """A new stream for `request`, forwarded by a task of its own (what _stop_pump stops)."""
        return asyncio.create_task(self._forward(self._stub.StreamEvents(request, metadata=self._metadata)))

    async def _forward(
        self,
        call: grpc.aio.UnaryStreamCall[event_pb2.StreamEventsRequest, event_pb2.Event],
        first: event_pb2.Event | None = None,
    ) -> None:
        try:
            # read(), not iteration: the handshake has already read the first message of its call.
            event = first if first is not None else await call.read()
            while isinstance(event, event_pb2.Event):  # until EOF
                if event.type != HEARTBEAT:
                    self._sent = event.id
                    # Whole even when a resubscription cancels this task: the id is already counted as sent.
                    await asyncio.shield(self._ws.send(self._frames.of(event)))
                event = await call.read()
            unavailable = grpc.StatusCode.UNAVAILABLE
            await self._close(CLOSE_CODES[unavailable], _error("the event stream ended", unavailable.name))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            await self._close(CLOSE_CODES.get(code, INTERNAL_CLOSE), _error(exc.details() or code.name, code.name))
        except ConnectionClosed:
            pass
        finally:
            call.cancel()

    async def _close(self, code: int, last: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(last)
            await self._ws.close(code)

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._ws.send(_error("binary messages are not read: send JSON text"))
            return
        if message.strip() == "ping":
            await self._ws.send("pong")
            return
        try:
            parsed = orjson.loads(message)
        except orjson.JSONDecodeError:
            if message.lstrip().startswith(("{", "[")):  # a control message gone wrong, not text to echo
                await self._ws.send(_error('not JSON: send {"type": "subscribe", "events": [...]} or {"type": "ping"}'))
            else:
                await self._ws.send(echo(message))
            return
        kind = parsed.get("type") if isinstance(parsed, dict) else None
        if kind == "ping":
            await self._ws.send(orjson.dumps({"type": "pong"}).decode())
        elif kind == "subscribe":
            try:
                names = subscribed_types(parsed)
            except ValueError as exc:
                await self._ws.send(_error(str(exc)))
                return
            now = time.monotonic()
            if len(self._subscribed) == SUBSCRIBE_BURST and now - self._subscribed[0] < SUBSCRIBE_WINDOW:
                limit = f"at most {SUBSCRIBE_BURST} subscriptions in {SUBSCRIBE_WINDOW:g} s: the last one still holds"
                await self._ws.send(_error(limit, "RESOURCE_EXHAUSTED"))
                return
            self._subscribed.append(now)
            await self._subscribe(names)
        else:
            await self._ws.send(_error(f"unknown message type {shown(kind)}: expected subscribe or ping"))

    async def _subscribe(self, names: list[str]) -> None:
        # The old stream stops before the answer, so every later frame is of the new types.
        await self._stop_pump()
        self._subscription = StreamQuery(self._subscription.filters, tuple(names), ())
        await self._ws.send(orjson.dumps({"type": "subscribed", "events": names}).decode())
        self._pump = self._start_pump(self._subscription.request(self._sent or self._resume_from))
