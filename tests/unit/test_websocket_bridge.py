"""The /ws bridge's parts that need no stack: its query and subscribe messages, its frames, how the
server tells its streams apart, the Envoy route and cluster it gets (one endpoint per worker), and
the handshakes it refuses before opening a stream (against a stand-in event service)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request

from flowport.server.auth.authenticator import MAX_DELAY
from flowport.server.auth.origin import TrustedProxies
from flowport.server.events import websocket
from flowport.server.events.websocket import (
    EVERY_TYPE,
    MAX_ECHO_CHARS,
    OPEN_TIMEOUT,
    BadHandshake,
    WebSocketBridge,
    echo,
    frame,
    parse_query,
    subscribed_types,
)
from flowport.server.settings import Settings
from flowport.server.transcoding import stream_transport
from flowport.transcoder.envoy_config import render
from flowport.v1 import event_pb2

pytestmark = pytest.mark.timeout(30)


def test_the_query_becomes_the_stream_request_and_unknown_parameters_are_refused() -> None:
    query, after = parse_query("session_id=ses_1&types=a&types=b&event_types=c,d&after_id=7")
    request = query.request(after)
    assert (request.session_id, list(request.types), list(request.event_types)) == ("ses_1", ["a", "b"], ["c,d"])
    assert request.after_id == "7"
    # No types: every event, the Kailash copies included.
    assert list(parse_query("")[0].request("").types) == list(EVERY_TYPE)
    assert "workflow_completed" in EVERY_TYPE and "heartbeat" not in EVERY_TYPE
    with pytest.raises(BadHandshake, match="sesion_id"):
        parse_query("sesion_id=ses_1")
    with pytest.raises(BadHandshake, match="twice"):
        parse_query("session_id=a&session_id=b")


def test_subscribe_takes_a_bounded_list_of_names() -> None:
    assert subscribed_types({"type": "subscribe", "events": ["a", "b", "a"]}) == ["a", "b"]
    assert subscribed_types({"type": "subscribe", "event_types": ["x"]}) == ["x"]
    for bad in ("a", [1], [""], ["a\nb"], ["t"] * 51):
        with pytest.raises(ValueError, match="events"):
            subscribed_types({"type": "subscribe", "events": bad})


def test_a_frame_is_the_event_with_event_and_timestamp() -> None:
    event = event_pb2.Event(id="9", type="workflow_completed", workflow_id="wf", error="boom")
    event.time.FromNanoseconds(1_700_000_000_500_000_000)
    event.data.update({"attempt": 3, "share": 0.5})
    body: dict[str, Any] = orjson.loads(frame(event))
    assert body["type"] == "workflow_completed" and body["workflow_id"] == "wf" and body["error"] == "boom"
    assert body["data"] == {"attempt": 3, "share": 0.5} and isinstance(body["data"]["attempt"], int)
    assert body["event"] == {k: v for k, v in body.items() if k not in ("event", "timestamp")}
    assert body["timestamp"] == 1_700_000_000.5
    assert body["session_id"] == "" and "progress" not in body  # printed as /events prints them


def test_an_events_frame_is_written_once_for_all_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection gets its own copy of an event from its stream; the bridge writes its text
    once (for the newest MAX_FRAMES events), not once per connection."""
    written: list[str] = []

    def counted(event: event_pb2.Event) -> str:
        written.append(event.id)
        return frame(event)

    monkeypatch.setattr(websocket, "frame", counted)
    monkeypatch.setattr(websocket, "MAX_FRAMES", 4)
    frames = websocket.Frames()
    first = [frames.of(event_pb2.Event(id="1", type="node.started", tenant="t")) for _ in range(300)]
    assert written == ["1"] and len(set(first)) == 1
    # Another type (a Kailash copy of the same id) or another tenant is another frame.
    frames.of(event_pb2.Event(id="1", type="workflow_started", tenant="t"))
    frames.of(event_pb2.Event(id="1", type="node.started", tenant="u"))
    assert written == ["1", "1", "1"]
    for n in range(2, 8):
        frames.of(event_pb2.Event(id=str(n), type="node.started", tenant="t"))
    assert len(frames._made) == 4
    frames.of(event_pb2.Event(id="1", type="node.started", tenant="t"))  # dropped since: written again
    assert written[-1] == "1" and len(written) == 10


def test_text_is_echoed_up_to_a_bound_and_never_quoted_beyond_it() -> None:
    assert echo("Hello") == "Echo: Hello"
    assert echo("a\r\nb") == "Echo: a\r\nb"  # the client's own text back, as sent
    assert echo("x" * MAX_ECHO_CHARS) == "Echo: " + "x" * MAX_ECHO_CHARS
    refused = orjson.loads(echo("x" * (MAX_ECHO_CHARS + 1)))
    assert refused["type"] == "error" and "xxxx" not in refused["error"]


class _Context:
    def __init__(self, peer: str, *metadata: tuple[str, str]) -> None:
        self._peer, self._metadata = peer, metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer


def test_only_the_bridge_on_loopback_marks_a_stream_as_websocket() -> None:
    mark = ("x-flowport-transport", "websocket")
    assert stream_transport(_Context("ipv4:127.0.0.1:5000", mark)) == "websocket"  # type: ignore[arg-type]
    assert stream_transport(_Context("ipv6:[::1]:5000", mark)) == "websocket"  # type: ignore[arg-type]
    assert stream_transport(_Context("ipv4:10.0.0.7:5000", mark)) == "grpc"  # type: ignore[arg-type]
    rest = ("x-envoy-original-path", "/events")
    assert stream_transport(_Context("ipv4:127.0.0.1:5000", mark, rest)) == "ndjson"  # type: ignore[arg-type]


def _routes_and_clusters(**values: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    config = render(Settings.load(values, environ={}))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"], config["static_resources"]["clusters"]


def test_envoy_upgrades_ws_to_each_workers_bridge_before_the_catch_all() -> None:
    routes, clusters = _routes_and_clusters(
        websocket_port=7000, workers=3, database_url="postgresql://db/x", redis_url="redis://r"
    )
    names = [r["name"] for r in routes]
    route = routes[names.index("websocket")]
    assert names.index("websocket") < names.index("rest")
    assert route["match"] == {"path": "/ws"} and route["route"]["upgrade_configs"] == [{"upgrade_type": "websocket"}]
    # An upgrade that reached no bridge goes to another server; whatever a bridge answers is final.
    retry = route["route"]["retry_policy"]
    assert set(retry["retry_on"].split(",")) == {"connect-failure", "reset"}
    assert "retriable_status_codes" not in retry and retry["retry_host_predicate"]
    # The buffer would wait for the end of a request that never ends; the edge Lua filter stays on.
    disabled = route["typed_per_filter_config"]
    assert {"envoy.filters.http.buffer", "envoy.filters.http.grpc_json_transcoder"} <= set(disabled)
    assert "envoy.filters.http.lua" not in disabled and "envoy.filters.http.local_ratelimit" not in disabled
    cluster = next(c for c in clusters if c["name"] == route["route"]["cluster"])
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [7000, 7001, 7002]
    routes, clusters = _routes_and_clusters(websocket_port=0)
    assert "websocket" not in [r["name"] for r in routes] and len(clusters) == 1


def test_the_handshake_outwaits_the_stall_of_a_failed_login() -> None:
    # Shorter, a repeated wrong key would be a 503 (retried for ever) instead of the stream's 401;
    # longer than websockets' own handshake limit, the client would get no answer at all.
    open_timeout = inspect.signature(serve).parameters["open_timeout"].default
    assert MAX_DELAY < OPEN_TIMEOUT < open_timeout


class _StalledEvents:
    """An EventService whose streams wait for `release`, then refuse the credential."""

    def __init__(self) -> None:
        self.calls = 0
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    async def stream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, event_pb2.Event]
    ) -> AsyncIterator[event_pb2.Event]:
        self.calls += 1
        self.called.set()
        await self.release.wait()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong key")
        yield event_pb2.Event()  # never reached: the handler is a stream's


async def _stand_in(events: _StalledEvents | _KeyedEvents) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    stream = grpc.unary_stream_rpc_method_handler(
        events.stream,
        request_deserializer=event_pb2.StreamEventsRequest.FromString,
        response_serializer=event_pb2.Event.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("flowport.v1.EventService", {"StreamEvents": stream}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_waiting_handshakes_are_bounded_and_a_plain_get_opens_no_stream() -> None:
    events = _StalledEvents()
    server, port = await _stand_in(events)
    bridge = WebSocketBridge(f"127.0.0.1:{port}", require_credential=True, trusted_proxies=frozenset(), max_pending=1)
    await bridge.start("127.0.0.1", 0)
    url, key = f"ws://127.0.0.1:{bridge.port}/ws", {"x-api-key": "fpk_wrong"}

    async def refusal() -> tuple[int, str | None, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=key, open_timeout=10, proxy=None):
                pass
        response = refused.value.response
        return response.status_code, response.headers.get("Retry-After"), orjson.loads(response.body or b"{}")

    try:
        waiting = asyncio.create_task(refusal())
        await asyncio.wait_for(events.called.wait(), 10)  # one handshake holds the only place
        status, retry_after, body = await refusal()
        assert (status, retry_after, body["code"]) == (503, "1", 14), body
        assert events.calls == 1  # refused without a stream
        async with httpx.AsyncClient(trust_env=False) as http:
            plain = await http.get(f"http://127.0.0.1:{bridge.port}/ws", headers=key)
        assert (plain.status_code, plain.headers["upgrade"], plain.json()["code"]) == (426, "websocket", 3)
        assert events.calls == 1
        events.release.set()
        assert (await waiting)[0] == 401  # the stream's refusal, once the server answers
        assert (await refusal())[0] == 401 and events.calls == 2  # its place is free again
    finally:
        await bridge.stop()
        await server.stop(0)


async def test_a_stream_that_does_not_start_in_time_is_a_gateway_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "OPEN_TIMEOUT", 0.5)
    events = _StalledEvents()
    server, port = await _stand_in(events)
    bridge = WebSocketBridge(f"127.0.0.1:{port}", require_credential=True, trusted_proxies=frozenset())
    await bridge.start("127.0.0.1", 0)
    try:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"ws://127.0.0.1:{bridge.port}/ws", additional_headers={"x-api-key": "fpk_slow"}, proxy=None
            ):
                pass
        response = refused.value.response
        body = orjson.loads(response.body or b"{}")
        assert (response.status_code, body["code"]) == (504, 4), body
        assert body["message"] == "the event stream did not start within 0.5 s"
    finally:
        events.release.set()
        await bridge.stop()
        await server.stop(0)


class _KeyedEvents:
    """An EventService that starts the streams of GOOD at once (a heartbeat) and holds every other
    key's until `release`, then refuses it, as the server stalls an address's repeated failures."""

    GOOD = "fpk_good"

    def __init__(self) -> None:
        self.stalled = 0  # streams held now
        self.changed = asyncio.Condition()
        self.release = asyncio.Event()

    async def stream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, event_pb2.Event]
    ) -> AsyncIterator[event_pb2.Event]:
        key = dict(context.invocation_metadata() or ()).get("x-api-key")
        if key == self.GOOD:
            yield event_pb2.Event(type="heartbeat")
            await asyncio.Event().wait()  # open until the bridge cancels it
        async with self.changed:
            self.stalled += 1
            self.changed.notify_all()
        try:
            await self.release.wait()
        finally:
            self.stalled -= 1
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong key")

    async def held(self, count: int) -> None:
        """Until `count` streams are held."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.stalled >= count)


async def test_one_address_failing_cannot_take_the_places_other_clients_wait_in() -> None:
    events = _KeyedEvents()
    server, port = await _stand_in(events)
    # Envoy on loopback: x-forwarded-for's last entry (Envoy's) is the client.
    bridge = WebSocketBridge(
        f"127.0.0.1:{port}",
        require_credential=True,
        trusted_proxies=TrustedProxies(["127.0.0.1"]),
        max_pending=3,
        max_pending_failing=2,
        max_pending_per_client=2,
    )
    await bridge.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{bridge.port}/ws"

    def handshake(key: str, forwarded: str) -> Any:
        headers = {"x-api-key": key, "x-forwarded-for": forwarded}
        return connect(url, additional_headers=headers, open_timeout=10, proxy=None)

    async def status(key: str, forwarded: str) -> tuple[int, str]:
        try:
            async with handshake(key, forwarded):
                return 101, ""
        except InvalidStatus as refused:
            body = orjson.loads(refused.response.body or b"{}")
            return refused.response.status_code, str(body.get("message", ""))

    flooder = "198.51.100.7"
    waiting: list[asyncio.Task[tuple[int, str]]] = []
    try:
        # Two stalled handshakes from one address (each claiming another address before Envoy's):
        # its share is full, the third is refused at once, whatever it claims.
        waiting += [asyncio.create_task(status(f"fpk_bad{n}", f"10.0.0.{n}, {flooder}")) for n in range(2)]
        await events.held(2)
        assert await status("fpk_bad2", f"10.0.0.9, {flooder}") == (
            503,
            "too many WebSocket handshakes waiting from one address (at most 2): try again shortly",
        )
        # Another address's valid key is let in meanwhile.
        assert (await status(_KeyedEvents.GOOD, "198.51.100.8"))[0] == 101
        events.release.set()
        assert [(await task)[0] for task in waiting] == [401, 401]  # still the bare 401, once answered
        events.release = asyncio.Event()
        # Refused 401 lately: its next handshakes wait apart, and leave the 3 shared places to others.
        waiting = [asyncio.create_task(status(f"fpk_bad{n}", flooder)) for n in range(2)]
        await events.held(2)
        waiting += [asyncio.create_task(status(f"fpk_other{n}", f"203.0.113.{n}")) for n in range(3)]
        await events.held(5)
        busy = "too many WebSocket handshakes waiting (at most 3): try again shortly"
        assert await status("fpk_more", "203.0.113.9") == (503, busy)
        events.release.set()
        assert [(await task)[0] for task in waiting] == [401] * 5
        # Failing addresses share their own places, bounded too: a second one finds them taken.
        events.release = asyncio.Event()
        waiting = [asyncio.create_task(status(f"fpk_bad{n}", flooder)) for n in range(2)]
        await events.held(2)
        busy = "too many WebSocket handshakes waiting (at most 2): try again shortly"
        assert await status("fpk_bad", "203.0.113.0") == (503, busy)
        events.release.set()
        assert [(await task)[0] for task in waiting] == [401, 401]
        events.release = asyncio.Event()
        # An address that upgrades is failing no more: it waits with the others again.
        assert (await status(_KeyedEvents.GOOD, "203.0.113.0"))[0] == 101
        waiting = [asyncio.create_task(status(f"fpk_bad{n}", flooder)) for n in range(2)]
        await events.held(2)
        assert (await status(_KeyedEvents.GOOD, "203.0.113.0"))[0] == 101
    finally:
        events.release.set()
        await asyncio.gather(*waiting, return_exceptions=True)
        await bridge.stop()
        await server.stop(0)


async def test_a_client_address_is_envoys_only_from_a_trusted_peer() -> None:
    events = _KeyedEvents()
    server, port = await _stand_in(events)
    # Nobody trusted: x-forwarded-for is the client's own claim, and every handshake here is 127.0.0.1's.
    bridge = WebSocketBridge(
        f"127.0.0.1:{port}", require_credential=True, trusted_proxies=TrustedProxies([]), max_pending_per_client=1
    )
    await bridge.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{bridge.port}/ws"

    async def status(forwarded: str) -> int:
        headers = {"x-api-key": "fpk_bad", "x-forwarded-for": forwarded}
        try:
            async with connect(url, additional_headers=headers, open_timeout=10, proxy=None):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    waiting = asyncio.create_task(status("198.51.100.1"))
    try:
        await events.held(1)
        assert await status("198.51.100.2") == 503
    finally:
        events.release.set()
        assert await waiting == 401
        await bridge.stop()
        await server.stop(0)


@pytest.mark.parametrize(
    ("peer", "forwarded", "passed", "counted"),
    [
        ("127.0.0.1", ["198.51.100.7"], "198.51.100.7", "198.51.100.7"),  # Envoy's own entry
        ("127.0.0.1", ["10.0.0.1, 198.51.100.7"], "198.51.100.7", "198.51.100.7"),  # claimed before it
        ("127.0.0.1", ["caf\u00e9, 198.51.100.7"], "198.51.100.7", "198.51.100.7"),  # an odd claim moves nothing
        ("127.0.0.1", ["10.0.0.1", "198.51.100.7"], "198.51.100.7", "198.51.100.7"),  # two headers
        ("127.0.0.1", [""], "127.0.0.1", "127.0.0.1"),  # nothing added: the peer
        ("192.0.2.5", ["198.51.100.7"], "192.0.2.5", "192.0.2.5"),  # an untrusted peer's claim is its own
        # IPv6: counted by its /64, which one customer holds whole; passed on as it is.
        ("127.0.0.1", ["2001:db8:1:2::5"], "2001:db8:1:2::5", "2001:db8:1:2::/64"),
        ("127.0.0.1", ["2001:db8:1:2:ffff::9"], "2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
        ("127.0.0.1", ["::ffff:198.51.100.7"], "::ffff:198.51.100.7", "198.51.100.7"),
    ],
)
def test_the_client_address_is_the_trusted_proxys_last_entry_passed_on_alone(
    peer: str, forwarded: list[str], passed: str, counted: str
) -> None:
    bridge = WebSocketBridge("127.0.0.1:1", require_credential=True, trusted_proxies=TrustedProxies(["127.0.0.1"]))

    class Connection:
        remote_address = (peer, 40000)

    request = Request("/ws", Headers([("x-forwarded-for", value) for value in forwarded]))
    assert bridge._addresses(Connection(), request) == (passed, counted)  # type: ignore[arg-type]
