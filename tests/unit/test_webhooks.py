"""WebhookService through an in-process gRPC server, and the dispatcher
delivering to real receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from google.protobuf import json_format

from flowport.clients import ApiError, AsyncClient
from flowport.clients.webhooks import verify_signature
from flowport.server import periodic
from flowport.server.api import webhooks as webhooks_api
from flowport.server.app import Running
from flowport.server.clock import now_us
from flowport.server.events.bus import BusEvent, EventBus
from flowport.server.interceptor import ErrorInterceptor
from flowport.server.metrics import RequestMetrics
from flowport.server.nodes.http import header_label
from flowport.server.observability.prometheus import Prometheus
from flowport.server.settings import Settings
from flowport.server.storage import Deletion, SqliteStore
from flowport.server.storage.group_commit import StoreUnavailable
from flowport.server.storage.migrate import bundled
from flowport.server.storage.tables import Connection
from flowport.server.storage.webhooks import WebhookTables
from flowport.server.types import Context
from flowport.server.webhooks import delivery as webhook_delivery
from flowport.server.webhooks import dispatcher as webhook_dispatcher
from flowport.server.webhooks.delivery import backoff
from flowport.server.webhooks.dispatcher import WebhookDispatcher
from flowport.v1 import apikey_pb2, execution_pb2, session_pb2, webhook_pb2, webhook_pb2_grpc, workflow_pb2

from ..conftest import ADMIN_KEY
from .test_http_nodes import (
    CLIENT_OWNED,  # the same rule: one list of the headers it names
    no_such_names,  # noqa: F401 - a fixture
)

W = webhook_pb2
D = webhook_pb2.WebhookDelivery
SECRET = "whsec-test-0123456789"


class _Store(SqliteStore, WebhookTables):
    """The store with the webhook tables mixed in (the app's SqliteStore gains them when wired)."""


# -- receivers -----------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.body))


Reply = tuple[int, dict[str, str]]
HANG: Reply = (-1, {})  # answer only once `release` is set (then 200)
Script = Callable[[int, Seen], Reply]


def _always(status: int) -> Script:
    return lambda n, seen: (status, {})


OK = _always(200)


class Receiver(ThreadingHTTPServer):
    """An HTTP receiver on 127.0.0.1 whose answers follow a script."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, script: Script, port: int = 0) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", port), _Handler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/hook"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on a hung request: expected here

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [seen.event for seen in self.seen]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver
    protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        seen = Seen(
            {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(int(self.headers["Content-Length"]))
        )
        with self.server.lock:
            self.server.seen.append(seen)
            number = len(self.server.seen)
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            status, headers = self.server.script(number, seen)
            if status == HANG[0]:
                self.server.release.wait(30)
                status = 200
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        finally:
            with self.server.lock:
                self.server.in_flight -= 1


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(script: Script = OK, port: int = 0) -> Receiver:
        receiver = Receiver(script, port)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the service and dispatcher, in process ---------------------------------------


def _tenant_from_metadata(context: Context) -> str:
    # Authentication does not exist yet; tests name the tenant in metadata.
    for key, value in context.invocation_metadata() or ():
        if key == "x-tenant":
            return str(value)
    return "default"


@pytest.fixture(autouse=True)
def _tenants(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # A whole server (`running`) authenticates its callers: its tenants come from their keys.
    if "running" not in request.fixturenames:
        monkeypatch.setattr(webhooks_api, "tenant_of", _tenant_from_metadata)


@dataclass
class Env:
    store: _Store
    bus: EventBus
    dispatcher: WebhookDispatcher
    client: AsyncClient

    async def create(self, url: str, tenant: str = "default", **fields: Any) -> W.Webhook:
        created: W.Webhook = await self.client.webhooks.CreateWebhook(
            W.CreateWebhookRequest(webhook=W.Webhook(url=url, **fields)), metadata=(("x-tenant", tenant),)
        )
        return created

    async def deliveries(self, webhook_id: str, tenant: str = "default", **fields: Any) -> list[D]:
        response = await self.client.webhooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(webhook_id=webhook_id, page_size=1000, **fields),
            metadata=(("x-tenant", tenant),),
        )
        return list(response.deliveries)

    def publish(self, type_: str = "execution.completed", tenant: str = "default", **data: Any) -> BusEvent:
        return self.bus.publish(type_, tenant=tenant, execution_id="exe_1", data=data)


@asynccontextmanager
async def running(
    data_dir: Path, initial_backoff: float = 0.02, tenant_share: int | None = None, **overrides: object
) -> AsyncIterator[Env]:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "webhook_allowlist": "127.0.0.1",
        "webhook_timeout": 5.0,
        "webhook_max_backoff": 0.2,
        "webhook_max_attempts": 5,
    }
    values.update(overrides)
    settings = Settings.load(values, environ={})
    store = cast(_Store, await _Store.open(settings.database_path))
    bus = EventBus()
    # No proxies from the environment: receivers are on loopback.
    http = httpx.AsyncClient(trust_env=False)
    dispatcher = WebhookDispatcher(
        store, bus, http, settings, initial_backoff=initial_backoff, tenant_share=tenant_share
    )
    await dispatcher.start()
    bus.add_listener(dispatcher.on_event)
    server = grpc.aio.server(interceptors=[ErrorInterceptor(RequestMetrics())])
    webhook_pb2_grpc.add_WebhookServiceServicer_to_server(
        webhooks_api.WebhookService(store, dispatcher, bus, settings), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = AsyncClient(f"127.0.0.1:{port}")
    try:
        yield Env(store, bus, dispatcher, client)
    finally:
        await client.close()
        await server.stop(None)
        await dispatcher.close()
        await http.aclose()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running(tmp_path) as e:
        yield e


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    """Poll `check` until it holds; fail naming `what` if it never does."""
    try:
        async with asyncio.timeout(timeout):
            # Polling: the state lives in receiver threads and the store, not in an asyncio.Event.
            while not await check():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def _error(awaitable: Awaitable[object]) -> ApiError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ApiError.from_rpc_error(caught.value)


def _states(deliveries: list[D]) -> list[str]:
    return [D.State.Name(d.state) for d in deliveries]


# -- the service --------------------------------------------------------------------


async def test_create_get_list_delete(env: Env, receivers: Callable[..., Receiver]) -> None:
    url = receivers().url()
    created = await env.create(
        url,
        event_types=["execution.*", "session.created", "execution.*"],
        headers={"Authorization": "Bearer t0k"},
        secret=SECRET,
        description="orders",
    )
    assert created.webhook_id.startswith("whk_") and created.tenant == "default"
    assert created.has_secret and created.secret == ""
    assert list(created.event_types) == ["execution.*", "session.created"]
    assert created.create_time.seconds > 0 and created.url == url
    assert dict(created.headers) == {"Authorization": "***"}  # write-only, like the secret
    got = await env.client.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id=created.webhook_id))
    assert got == created

    named = await env.create(url, webhook_id="a-hook.1")
    assert named.webhook_id == "a-hook.1" and not named.has_secret
    taken = await _error(env.create(url, webhook_id="a-hook.1"))
    assert (taken.code(), taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WEBHOOK_ALREADY_EXISTS")
    await env.create(url, webhook_id="b-hook")

    first = await env.client.webhooks.ListWebhooks(W.ListWebhooksRequest(page_size=2))
    rest = await env.client.webhooks.ListWebhooks(W.ListWebhooksRequest(page_size=2, page_token=first.next_page_token))
    listed = [*first.webhooks, *rest.webhooks]
    assert [w.webhook_id for w in listed] == sorted(["a-hook.1", "b-hook", created.webhook_id])
    assert rest.next_page_token == "" and all(w.secret == "" for w in listed)
    assert all("t0k" not in str(w) for w in listed)

    await env.client.webhooks.DeleteWebhook(W.DeleteWebhookRequest(webhook_id="a-hook.1"))
    for call in (
        env.client.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id="a-hook.1")),
        env.client.webhooks.DeleteWebhook(W.DeleteWebhookRequest(webhook_id="a-hook.1")),
        env.client.webhooks.ListWebhookDeliveries(W.ListWebhookDeliveriesRequest(webhook_id="a-hook.1")),
    ):
        error = await _error(call)
        assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")


async def test_create_is_idempotent_with_request_id(env: Env, receivers: Callable[..., Receiver]) -> None:
    url = receivers().url()
    request = W.CreateWebhookRequest(webhook=W.Webhook(url=url, secret=SECRET), request_id="req-1")
    first = await env.client.webhooks.CreateWebhook(request)
    again = await env.client.webhooks.CreateWebhook(request)
    assert again == first
    other = W.CreateWebhookRequest(webhook=W.Webhook(url=url, secret=SECRET + "x"), request_id="req-1")
    error = await _error(env.client.webhooks.CreateWebhook(other))
    assert (error.code(), error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    listed = await env.client.webhooks.ListWebhooks(W.ListWebhooksRequest())
    assert [w.webhook_id for w in listed.webhooks] == [first.webhook_id]


@pytest.mark.parametrize(
    ("webhook", "field"),
    [
        (W.Webhook(), "webhook.url"),
        (W.Webhook(url="ftp://example.com/hook"), "webhook.url"),
        (W.Webhook(url="https://"), "webhook.url"),
        (W.Webhook(url="http://example.com/hook"), "webhook.url"),  # plain http, not allowlisted
        (W.Webhook(url="https://user:pw@example.com/hook"), "webhook.url"),
        (W.Webhook(url="https://10.1.2.3/hook"), "webhook.url"),
        (W.Webhook(url="https://192.168.0.10/hook"), "webhook.url"),
        (W.Webhook(url="https://169.254.169.254/latest/meta-data"), "webhook.url"),
        (W.Webhook(url="https://127.0.0.2/hook"), "webhook.url"),  # only 127.0.0.1 is allowlisted
        (W.Webhook(url="https://[::1]:8443/hook"), "webhook.url"),
        (W.Webhook(url="https://[::ffff:10.0.0.1]/hook"), "webhook.url"),
        (W.Webhook(url="https://example.com/hook", secret="too-short"), "webhook.secret"),
        (W.Webhook(url="https://example.com/hook", event_types=["Execution Completed"]), "webhook.event_types"),
        (W.Webhook(url="https://example.com/hook", event_types=["*"]), "webhook.event_types"),
        (W.Webhook(url="https://example.com/hook", event_types=["execution.*.x"]), "webhook.event_types"),
        (W.Webhook(url="https://example.com/hook", headers={"Host": "a"}), "webhook.headers.Host"),
        (W.Webhook(url="https://example.com/hook", headers={"content-length": "1"}), "webhook.headers.content-length"),
        (
            W.Webhook(url="https://example.com/hook", headers={"Transfer-Encoding": "chunked"}),
            "webhook.headers.Transfer-Encoding",
        ),
        (
            W.Webhook(url="https://example.com/hook", headers={"X-Flowport-Signature": "t=1"}),
            "webhook.headers.X-Flowport-Signature",
        ),
        (W.Webhook(url="https://example.com/hook", headers={"bad name": "a"}), "webhook.headers"),
        # `$` in a pattern also matches before a final newline: this one used to be accepted.
        (W.Webhook(url="https://example.com/hook", headers={"X-A\n": "a"}), "webhook.headers"),
        (W.Webhook(url="https://example.com/hook", headers={"X-A": "a\r\nX-B: b"}), "webhook.headers.X-A"),
        (W.Webhook(url="https://example.com/hook", headers={"X-A": "a", "x-a": "b"}), "webhook.headers.x-a"),
        (W.Webhook(url="https://example.com/hook", webhook_id="has space"), "webhook.webhook_id"),
        (W.Webhook(url="https://example.com/hook", webhook_id="x" * 129), "webhook.webhook_id"),
    ],
)
async def test_invalid_webhooks_name_the_field(env: Env, webhook: W.Webhook, field: str) -> None:
    error = await _error(env.client.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=webhook)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == [field]


async def test_every_problem_is_reported_at_once(env: Env) -> None:
    webhook = W.Webhook(url="https://10.0.0.1/", secret="short", headers={"Host": "x"}, event_types=["?"])
    error = await _error(env.client.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=webhook)))
    assert {f for f, _ in error.violations} == {
        "webhook.url",
        "webhook.secret",
        "webhook.headers.Host",
        "webhook.event_types",
    }
    assert "short" not in error.message  # the secret is never echoed


async def test_header_values_http_cannot_carry_are_refused_without_showing_them(env: Env) -> None:
    for value in ("Bearer t\u00f6k-XYZ", "Bearer \x01XYZ", "Bearer XYZ "):
        webhook = W.Webhook(url="https://example.com/hook", headers={"Authorization": value})
        error = await _error(env.client.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=webhook)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error.violations] == ["webhook.headers.Authorization"]
        described = error.message + str(error.violations)
        assert "Authorization" in described and "XYZ" not in described and "\u00f6" not in described


@pytest.mark.parametrize("name", [*CLIENT_OWNED, "transfer-encoding", "HOST"])
async def test_headers_the_http_client_owns_are_refused(env: Env, name: str) -> None:
    webhook = W.Webhook(url="https://example.com/hook", headers={name: "internal.admin"})
    error = await _error(env.client.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=webhook)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = error.violations
    assert field == f"webhook.headers.{name}"
    assert description.startswith("is set by the HTTP client"), description
    assert "internal.admin" not in error.message + description


async def test_an_invalid_header_name_is_quoted_not_echoed_raw(env: Env) -> None:
    webhook = W.Webhook(url="https://example.com/hook", headers={"X-A\r\nHost: internal.admin": "v"})
    error = await _error(env.client.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=webhook)))
    [(field, description)] = error.violations
    assert field == "webhook.headers"
    assert description.startswith("'X-A\\r\\nHost: ") and "is not a valid HTTP header name" in description
    assert "\r" not in error.message + description and "\n" not in error.message + description


async def test_tenants_are_isolated(env: Env, receivers: Callable[..., Receiver]) -> None:
    at_a, at_b = receivers(), receivers()
    await env.create(at_a.url(), tenant="a", webhook_id="shared")
    b = (("x-tenant", "b"),)
    for call in (
        env.client.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id="shared"), metadata=b),
        env.client.webhooks.DeleteWebhook(W.DeleteWebhookRequest(webhook_id="shared"), metadata=b),
        env.client.webhooks.ListWebhookDeliveries(W.ListWebhookDeliveriesRequest(webhook_id="shared"), metadata=b),
    ):
        assert (await _error(call)).code() is grpc.StatusCode.NOT_FOUND
    assert not (await env.client.webhooks.ListWebhooks(W.ListWebhooksRequest(), metadata=b)).webhooks
    # Ids are per tenant: B may use the same one, and learns nothing about A's.
    await env.create(at_b.url(), tenant="b", webhook_id="shared")

    for_a = env.publish(tenant="a", n=1)
    for_b = env.publish(tenant="b", n=2)

    async def both_delivered() -> bool:
        return len(at_a.seen) == 1 and len(at_b.seen) == 1

    await eventually(both_delivered, "one delivery to each tenant's webhook")
    assert [(e["id"], e["tenant"]) for e in at_a.events()] == [(for_a.id, "a")]
    assert [(e["id"], e["tenant"]) for e in at_b.events()] == [(for_b.id, "b")]
    assert [d.event_id for d in await env.deliveries("shared", tenant="a")] == [for_a.id]
    assert [d.event_id for d in await env.deliveries("shared", tenant="b")] == [for_b.id]


# -- delivery -----------------------------------------------------------------------


async def test_deliveries_are_signed_filtered_and_carry_headers(env: Env, receivers: Callable[..., Receiver]) -> None:
    signed, unsigned = receivers(), receivers()
    hook = await env.create(
        signed.url(), event_types=["execution.*"], headers={"Authorization": "Bearer t0k"}, secret=SECRET
    )
    plain = await env.create(unsigned.url())  # no event types: every event
    env.publish("session.created")
    event = env.publish("execution.completed", n=1, items=[1, "x"])

    async def done() -> bool:
        return (
            len(await env.deliveries(hook.webhook_id, state=D.STATE_SUCCEEDED)) == 1
            and len(await env.deliveries(plain.webhook_id, state=D.STATE_SUCCEEDED)) == 2
            and env.dispatcher.delivered == 3
        )

    await eventually(done, "deliveries to both receivers")
    [delivery] = await env.deliveries(hook.webhook_id)
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == (D.STATE_SUCCEEDED, 1, 200)
    assert delivery.last_error == "" and not delivery.HasField("next_attempt_time")
    assert delivery.event_id == event.id and delivery.event_type == "execution.completed"

    seen = signed.seen[0]
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"].startswith("flowport-webhooks/")
    assert seen.headers["x-flowport-event-id"] == event.id
    assert seen.headers["x-flowport-delivery-id"] == delivery.delivery_id
    assert seen.headers["x-flowport-delivery-attempt"] == "1"
    assert seen.headers["authorization"] == "Bearer t0k"
    assert verify_signature(SECRET, seen.headers["x-flowport-signature"], seen.body)
    assert not verify_signature(SECRET, seen.headers["x-flowport-signature"], seen.body + b" ")
    assert not any(SECRET in value for value in seen.headers.values())
    body = seen.event
    assert body["id"] == event.id and body["type"] == "execution.completed" and body["tenant"] == "default"
    assert body["execution_id"] == "exe_1" and body["data"] == {"n": 1, "items": [1, "x"]}
    assert body["time"].endswith("Z") and body["session_id"] == ""

    assert all("x-flowport-signature" not in s.headers for s in unsigned.seen)
    assert sorted(e["type"] for e in unsigned.events()) == ["execution.completed", "session.created"]


async def test_a_content_type_header_is_accepted_and_deliveries_stay_json(
    env: Env, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    # Kailash clients send one; flowport accepts it, keeps the rest, and always delivers JSON.
    hook = await env.create(receiver.url(), headers={"content-type": "text/plain", "X-Team": "a"})
    assert dict(hook.headers) == {"X-Team": webhooks_api.HIDDEN}
    event = env.publish(n=1)

    async def delivered() -> bool:
        return bool(receiver.seen)

    await eventually(delivered, "a delivery")
    seen = receiver.seen[0]
    assert seen.headers["content-type"] == "application/json" and seen.headers["x-team"] == "a"
    assert seen.event["id"] == event.id


def test_a_stored_content_type_never_reaches_the_wire() -> None:
    # A Content-Type in a target's headers (in any case) would otherwise go out next to flowport's own.
    target = webhook_delivery.Target(httpx.URL("https://example.com/"), {"CONTENT-TYPE": "text/plain"}, b"")
    sent = httpx.Headers(webhook_delivery._headers(target, b"{}", "1", "dlv_1", 1))
    assert sent.get_list("content-type") == ["application/json"]


async def test_receiver_down_then_500_then_200(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    port = _free_port()
    async with running(tmp_path, webhook_max_attempts=50) as env:
        hook = await env.create(f"http://127.0.0.1:{port}/hook")
        event = env.publish(n=1)

        async def refused() -> bool:
            found = await env.deliveries(hook.webhook_id)
            return bool(found) and found[0].attempts >= 1

        await eventually(refused, "a failed attempt while nothing listens")
        [delivery] = await env.deliveries(hook.webhook_id)
        assert delivery.state in (D.STATE_RETRYING, D.STATE_PENDING) and delivery.last_status_code == 0
        assert "ConnectError" in delivery.last_error

        receiver = receivers(lambda n, seen: (500, {}) if n == 1 else (200, {}), port=port)

        async def succeeded() -> bool:
            return (
                _states(await env.deliveries(hook.webhook_id)) == ["STATE_SUCCEEDED"] and env.dispatcher.delivered == 1
            )

        await eventually(succeeded, "delivery once the receiver answers 200")
        [delivery] = await env.deliveries(hook.webhook_id)
        attempts = [int(s.headers["x-flowport-delivery-attempt"]) for s in receiver.seen]
        assert len(attempts) == 2 and attempts[1] == attempts[0] + 1 == delivery.attempts >= 3
        assert {s.headers["x-flowport-delivery-id"] for s in receiver.seen} == {delivery.delivery_id}
        assert {s.headers["x-flowport-event-id"] for s in receiver.seen} == {event.id}
        assert receiver.seen[0].body == receiver.seen[1].body
        assert delivery.last_status_code == 200 and delivery.last_error == ""
        assert env.dispatcher.retried == delivery.attempts - 1


async def test_retry_after_is_honoured_and_other_4xx_fail_at_once(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    busy = receivers(_always_reply(503, {"Retry-After": "3600"}))
    gone = receivers(_always(404))
    async with running(tmp_path, webhook_max_backoff=50.0) as env:
        # Only execution events: the webhook.failed of the other one would muddle the count.
        later = await env.create(busy.url(), event_types=["execution.*"])
        never = await env.create(gone.url())
        env.publish()

        async def settled() -> bool:
            retrying = await env.deliveries(later.webhook_id, state=D.STATE_RETRYING)
            dead = await env.deliveries(never.webhook_id, state=D.STATE_DEAD_LETTERED)
            return len(retrying) == 1 and len(dead) == 1

        await eventually(settled, "one delivery retrying, the other dead-lettered")
        [retrying] = await env.deliveries(later.webhook_id)
        # Retry-After asked for an hour; the wait is capped at webhook_max_backoff.
        wait_us = retrying.next_attempt_time.ToMicroseconds() - retrying.update_time.ToMicroseconds()
        assert wait_us == 50_000_000 and retrying.last_status_code == 503
        [dead] = await env.deliveries(never.webhook_id)
        assert (dead.attempts, dead.last_status_code) == (1, 404) and "HTTP 404" in dead.last_error
        assert len(gone.seen) == 1


def _always_reply(status: int, headers: dict[str, str]) -> Script:
    return lambda n, seen: (status, headers)


def test_backoff_is_full_jitter_within_a_doubling_capped_window() -> None:
    for attempt in range(1, 12):
        window = min(30.0, 1.0 * 2 ** (attempt - 1))
        samples = [backoff(attempt, 1.0, 30.0) for _ in range(200)]
        assert all(0.0 <= s <= window for s in samples)
        assert max(samples) > window / 2  # spread over the window, not pinned to its start
    assert backoff(1000, 1.0, 30.0) <= 30.0


async def test_dead_letter_publishes_webhook_failed_and_redelivery_works(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    answering = threading.Event()
    silent = receivers(lambda n, seen: (200, {}) if answering.is_set() else HANG)
    watcher = receivers()
    # A second to answer: the watcher below must never miss it on a slow machine.
    async with running(tmp_path, webhook_timeout=1.0, webhook_max_attempts=2, initial_backoff=0.01) as env:
        failures = env.bus.subscribe(lambda e: e.type == "webhook.failed")
        hook = await env.create(silent.url())
        watching = await env.create(watcher.url(), event_types=["webhook.failed", "execution.*"])
        event = env.publish()

        failed = await failures.next(timeout=15)
        assert failed is not None and failed.tenant == "default"
        [delivery] = await env.deliveries(hook.webhook_id)
        assert failed.data == {
            "webhook_id": hook.webhook_id,
            "delivery_id": delivery.delivery_id,
            "event_id": event.id,
            "event_type": "execution.completed",
            "attempts": 2,
            "last_status_code": 0,
            "last_error": "no answer within 1s",
        }
        assert (delivery.state, delivery.attempts) == (D.STATE_DEAD_LETTERED, 2)
        assert env.dispatcher.dead_lettered == 1

        async def watcher_told() -> bool:
            return len(await env.deliveries(watching.webhook_id, state=D.STATE_SUCCEEDED)) == 2

        await eventually(watcher_told, "the other webhook receives webhook.failed")
        assert sorted(e["type"] for e in watcher.events()) == ["execution.completed", "webhook.failed"]
        # The failing webhook is never sent its own failure.
        assert [d.event_type for d in await env.deliveries(hook.webhook_id)] == ["execution.completed"]

        succeeded = (await env.deliveries(watching.webhook_id, state=D.STATE_SUCCEEDED))[0]
        redeliver = env.client.webhooks.RedeliverWebhookDelivery
        error = await _error(
            redeliver(
                W.RedeliverWebhookDeliveryRequest(webhook_id=watching.webhook_id, delivery_id=succeeded.delivery_id)
            )
        )
        assert (error.code(), error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DELIVERY_NOT_DEAD_LETTERED")
        error = await _error(
            redeliver(W.RedeliverWebhookDeliveryRequest(webhook_id=hook.webhook_id, delivery_id="dlv_x"))
        )
        assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "DELIVERY_NOT_FOUND")

        answering.set()
        request = W.RedeliverWebhookDeliveryRequest(
            webhook_id=hook.webhook_id, delivery_id=delivery.delivery_id, request_id="again-1"
        )
        queued = await redeliver(request)
        assert (queued.state, queued.attempts) == (D.STATE_PENDING, 0)

        async def redelivered() -> bool:
            return _states(await env.deliveries(hook.webhook_id)) == ["STATE_SUCCEEDED"]

        await eventually(redelivered, "the redelivered delivery succeeds")
        [done] = await env.deliveries(hook.webhook_id)
        assert done.attempts == 1
        # The budget starts afresh, and so does the attempt header.
        assert [s.headers["x-flowport-delivery-attempt"] for s in silent.seen] == ["1", "2", "1"]
        # The same request_id replays the first answer instead of failing on the new state.
        assert await redeliver(request) == queued


async def test_a_failed_failure_report_is_not_reported_again(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    broken, sink = receivers(_always(500)), receivers(_always(400))
    async with running(tmp_path, webhook_max_attempts=1) as env:
        failures = env.bus.subscribe(lambda e: e.type == "webhook.failed")
        await env.create(broken.url(), event_types=["execution.*"])
        reports = await env.create(sink.url(), event_types=["webhook.failed"])
        env.publish()
        assert await failures.next(timeout=15) is not None

        async def sink_failed() -> bool:
            return _states(await env.deliveries(reports.webhook_id)) == ["STATE_DEAD_LETTERED"]

        await eventually(sink_failed, "the report's own delivery dead-letters")

        async def idle() -> bool:
            return env.dispatcher.unfinished == 0

        await eventually(idle, "nothing left to deliver")
        await asyncio.sleep(0.05)  # room for a (wrong) second report to be published
        assert failures.queue.empty()
        assert env.dispatcher.dead_lettered == 2


async def test_restart_loses_no_pending_delivery(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    port = _free_port()
    async with running(tmp_path, webhook_max_attempts=50) as env:
        hook = await env.create(f"http://127.0.0.1:{port}/hook")
        published = [env.publish(n=i).id for i in range(5)]
        # Closing at once: the rows of what was published are written by close().
    receiver = receivers(port=port)
    async with running(tmp_path, webhook_max_attempts=50) as env:
        unfinished = await env.store.unfinished_deliveries()
        assert len(unfinished) == 5

        async def all_delivered() -> bool:
            return _states(await env.deliveries(hook.webhook_id)) == ["STATE_SUCCEEDED"] * 5

        await eventually(all_delivered, "every delivery queued before the restart succeeds after it")
        assert {e["id"] for e in receiver.events()} == set(published)
        assert env.dispatcher.unfinished == 0


@pytest.mark.usefixtures("no_such_names")
async def test_targets_resolving_to_internal_addresses_are_refused(
    tmp_path: Path, receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receivers()
    async with running(tmp_path, webhook_allowlist="") as env:
        error = await _error(env.create(receiver.url()))
        assert error.violations and error.violations[0][0] == "webhook.url"
        error = await _error(env.create(receiver.url(scheme="https")))
        assert "127.0.0.1 is a private" in error.violations[0][1]  # the address the tenant wrote is named
        # A host name passes registration; its address is checked at every attempt. One that does
        # not resolve fails the same way: the tenant cannot tell which, so cannot map internal names.
        hosts = ("localhost", "nonexistent.invalid")
        hooks = [
            await env.create(receiver.url(scheme="https", host=host), event_types=["execution.completed"])
            for host in hosts
        ]
        with caplog.at_level(logging.INFO, logger="flowport.server.egress"):
            env.publish()

            async def refused() -> bool:
                states = [_states(await env.deliveries(hook.webhook_id)) for hook in hooks]
                return states == [["STATE_DEAD_LETTERED"]] * len(hooks)

            await eventually(refused, "the deliveries to localhost and to a name that does not resolve are refused")
        errors = []
        for host, hook in zip(hosts, hooks, strict=True):
            [delivery] = await env.deliveries(hook.webhook_id)
            assert delivery.attempts == 1 and delivery.last_status_code == 0
            assert f"target {host} " in delivery.last_error
            errors.append(delivery.last_error.replace(host, "HOST"))
        assert errors[0] == errors[1], errors
        assert "internal address" in errors[0] and "not allowlisted" in errors[0]
        assert "(--webhook-allowlist, or --dev for loopback)" in errors[0]  # the setting that would allow it
        for leak in ("127.0.0.1", "::1", "Errno", "-2", "not known"):
            assert leak not in errors[0], leak
        assert receiver.connections == 0
    # The server log says which, for whom.
    logged = [r.getMessage() for r in caplog.records if r.name == "flowport.server.egress"]
    assert len(logged) == 2, logged
    inside = next(line for line in logged if "localhost" in line)
    nowhere = next(line for line in logged if "nonexistent.invalid" in line)
    assert "tenant default" in inside and "127.0.0.1" in inside
    assert "tenant default" in nowhere and "Errno" in nowhere


async def test_a_slow_receiver_does_not_delay_other_webhooks(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    slow, fast = receivers(lambda n, seen: HANG), receivers()
    async with running(tmp_path, webhook_timeout=30.0, webhook_concurrency_per_target=2) as env:
        stuck = await env.create(slow.url())
        quick = await env.create(fast.url())
        for i in range(6):
            env.publish(n=i)

        async def fast_done() -> bool:
            return len(await env.deliveries(quick.webhook_id, state=D.STATE_SUCCEEDED)) == 6

        await eventually(fast_done, "all deliveries to the fast receiver")

        async def slow_saturated() -> bool:
            return slow.in_flight == 2

        await eventually(slow_saturated, "the slow receiver holds its two concurrent deliveries")
        assert not await env.deliveries(stuck.webhook_id, state=D.STATE_SUCCEEDED)
        slow.release.set()

        async def slow_done() -> bool:
            return len(await env.deliveries(stuck.webhook_id, state=D.STATE_SUCCEEDED)) == 6

        await eventually(slow_done, "all deliveries to the slow receiver once it answers")
        assert slow.max_in_flight == 2


async def test_a_tenants_many_slow_webhooks_hold_only_its_share_of_deliveries(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    slow, fast = receivers(lambda n, seen: HANG), receivers()
    async with running(tmp_path, webhook_timeout=30.0, webhook_concurrency_per_target=2, tenant_share=2) as env:
        # Three webhooks of two deliveries each: six at once without the tenant's share.
        noisy = [await env.create(slow.url(), tenant="noisy") for _ in range(3)]
        quiet = await env.create(fast.url(), tenant="quiet")
        for i in range(3):
            env.publish(tenant="noisy", n=i)

        async def noisy_at_its_share() -> bool:
            return slow.in_flight == 2

        await eventually(noisy_at_its_share, "the noisy tenant's deliveries fill its share")
        env.publish(tenant="quiet", n=0)

        async def quiet_done() -> bool:
            return len(await env.deliveries(quiet.webhook_id, tenant="quiet", state=D.STATE_SUCCEEDED)) == 1

        await eventually(quiet_done, "the other tenant's delivery, while the noisy one's hang")
        assert slow.max_in_flight == 2
        slow.release.set()

        async def noisy_done() -> bool:
            done = [await env.deliveries(h.webhook_id, tenant="noisy", state=D.STATE_SUCCEEDED) for h in noisy]
            return sum(len(d) for d in done) == 9

        await eventually(noisy_done, "every delivery of the noisy tenant once its receiver answers")
        assert slow.max_in_flight == 2


async def test_deleting_a_webhook_drops_its_pending_deliveries(tmp_path: Path) -> None:
    port = _free_port()
    async with running(tmp_path, webhook_max_attempts=50) as env:
        hook = await env.create(f"http://127.0.0.1:{port}/hook", webhook_id="doomed")
        for _ in range(3):
            env.publish()

        async def attempted() -> bool:
            found = await env.deliveries(hook.webhook_id)
            return len(found) == 3 and all(d.attempts >= 1 for d in found)

        await eventually(attempted, "three failing deliveries")
        await env.client.webhooks.DeleteWebhook(W.DeleteWebhookRequest(webhook_id="doomed"))
        assert env.dispatcher.unfinished == 0
        assert await env.store.unfinished_deliveries() == []
        await env.create(f"http://127.0.0.1:{port}/hook", webhook_id="doomed")
        assert await env.deliveries("doomed") == []


async def test_deliveries_list_newest_first_with_pages_and_state_filter(
    env: Env, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(lambda n, seen: (200, {}) if seen.event["data"]["ok"] else (410, {}))
    hook = await env.create(receiver.url(), event_types=["execution.*"])
    published = [env.publish(ok=i % 2 == 0).id for i in range(5)]

    async def finished() -> bool:
        found = await env.deliveries(hook.webhook_id)
        return len(found) == 5 and all(d.state in (D.STATE_SUCCEEDED, D.STATE_DEAD_LETTERED) for d in found)

    await eventually(finished, "five finished deliveries")
    request = W.ListWebhookDeliveriesRequest(webhook_id=hook.webhook_id, page_size=2)
    pages: list[list[str]] = []
    tokens: list[str] = []
    while True:
        page = await env.client.webhooks.ListWebhookDeliveries(request)
        pages.append([d.event_id for d in page.deliveries])
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
        tokens.append(page.next_page_token)
    assert pages == [published[4:2:-1], published[2:0:-1], published[:1]]
    dead = await env.deliveries(hook.webhook_id, state=D.STATE_DEAD_LETTERED)
    assert [d.event_id for d in dead] == [published[3], published[1]]

    bad_state = W.ListWebhookDeliveriesRequest(webhook_id=hook.webhook_id, state=cast(Any, 99))
    assert (await _error(env.client.webhooks.ListWebhookDeliveries(bad_state))).violations[0][0] == "state"
    # A token only works with the filters it was issued for.
    other_filter = W.ListWebhookDeliveriesRequest(
        webhook_id=hook.webhook_id, state=D.STATE_SUCCEEDED, page_size=2, page_token=tokens[0]
    )
    error = await _error(env.client.webhooks.ListWebhookDeliveries(other_filter))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT

    # Finished deliveries expire; unfinished ones never do.
    slow = receivers(lambda n, seen: HANG)
    waiting = await env.create(slow.url(), event_types=["session.*"])
    env.publish("session.created", ok=True)

    async def in_flight() -> bool:
        return slow.in_flight == 1

    await eventually(in_flight, "a delivery in flight")
    assert await env.store.purge_finished_deliveries(before_us=0) == 0
    hour_ahead = (time.time_ns() // 1000) + 3_600_000_000
    assert await env.store.purge_finished_deliveries(before_us=hour_ahead) == 5
    assert [d.webhook_id for d in await env.store.unfinished_deliveries()] == [waiting.webhook_id]


async def _attempt_once(receiver: Receiver, headers: dict[str, str]) -> webhook_delivery.Outcome:
    """One delivery attempt of `{}` to `receiver` with the webhook's `headers`; its outcome."""
    target = webhook_delivery.Target(httpx.URL(receiver.url()), headers, b"")
    async with httpx.AsyncClient() as http:
        return await webhook_delivery.attempt(
            http,
            target,
            body=b"{}",
            event_id="evt_1",
            delivery_id="dlv_1",
            attempt_number=1,
            timeout=5.0,
            allowlist=frozenset({"127.0.0.1"}),
        )


async def test_a_header_value_http_cannot_carry_fails_for_good_without_showing_it(
    receivers: Callable[..., Receiver],
) -> None:
    receiver = receivers()
    # Webhook headers carry the receiver's credentials: the error names the header, never a character of it.
    outcome = await _attempt_once(receiver, {"Authorization": "Bearer t\u00f6ken-XYZ"})
    assert (outcome.status_code, outcome.retryable) == (0, False)
    assert outcome.error.startswith("header Authorization holds"), outcome.error
    for shown in ("\u00f6", "xf6", "XYZ", "ken"):
        assert shown not in outcome.error
    assert receiver.connections == 0


@pytest.mark.parametrize(
    "headers",
    [{"Host": "internal.admin"}, {"transfer-encoding": "chunked"}, {"User-Agent": "x"}, {"X-A\n": "v"}],
)
async def test_a_stored_header_registration_now_refuses_fails_for_good_at_delivery(
    receivers: Callable[..., Receiver], headers: dict[str, str]
) -> None:
    # Stored before registration refused it: a Host or Transfer-Encoding of its own would go out
    # next to flowport's. The delivery dead-letters at once, naming the header, and sends nothing.
    receiver = receivers()
    outcome = await _attempt_once(receiver, headers)
    assert (outcome.status_code, outcome.retryable) == (0, False)
    [name] = headers
    assert outcome.error.startswith(f"header {header_label(name)} "), outcome.error
    assert "cannot be given" in outcome.error or "not a valid HTTP header name" in outcome.error, outcome.error
    assert "internal.admin" not in outcome.error and "chunked" not in outcome.error
    assert receiver.connections == 0


# -- webhooks belong to the credential that registered them --------------------------


async def _acme_key(root: AsyncClient, role: str) -> tuple[str, str]:
    """A new key of tenant acme with `role`: (its id, the key)."""
    created = await root.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme", roles=[role]))
    )
    return created.api_key.key_id, created.key


def _merge_workflow() -> workflow_pb2.Workflow:
    workflow = workflow_pb2.Workflow(name="merge")
    json_format.ParseDict({"nodes": [{"type": "MergeNode", "name": "m"}]}, workflow)
    return workflow


async def _run(client: AsyncClient, workflow_id: str, session_id: str = "") -> execution_pb2.Execution:
    ran: execution_pb2.Execution = await client.executions.CreateExecution(
        execution_pb2.CreateExecutionRequest(workflow_id=workflow_id, session_id=session_id, wait=True)
    )
    assert ran.state == execution_pb2.Execution.STATE_SUCCEEDED, ran.error.message
    return ran


async def _all_delivered(client: AsyncClient, webhook_id: str, state: int, receiver: Receiver) -> bool:
    """Every delivery of the webhook is in `state`, each seen by the receiver once."""
    found = (
        await client.webhooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(webhook_id=webhook_id, page_size=1000)
        )
    ).deliveries
    return all(d.state == state for d in found) and len(found) == len(receiver.seen)


@pytest.mark.timeout(180)
async def test_a_users_webhook_gets_only_what_its_credential_may_stream(
    running: Running, receivers: Callable[..., Receiver]
) -> None:
    target = f"127.0.0.1:{running.port}"
    async with AsyncClient(target, api_key=ADMIN_KEY) as root:
        ada_id, ada_key = await _acme_key(root, "user")
        bob_id, bob_key = await _acme_key(root, "user")
        _boss_id, boss_key = await _acme_key(root, "admin")
    ada_seen, boss_seen = receivers(), receivers()
    # Receivers that refuse every delivery: each failure is reported as webhook.failed.
    ada_refuses, bob_refuses = receivers(_always(410)), receivers(_always(410))
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        ada_hook = await ada.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=W.Webhook(url=ada_seen.url())))
        boss_hook = await boss.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=W.Webhook(url=boss_seen.url())))
        assert ada_hook.creator == ada_id and boss_hook.creator != ada_id
        failing: dict[str, W.Webhook] = {}
        for name, client, receiver in (("ada", ada, ada_refuses), ("bob", bob, bob_refuses)):
            failing[name] = await client.webhooks.CreateWebhook(
                W.CreateWebhookRequest(webhook=W.Webhook(url=receiver.url(), event_types=["execution.completed"]))
            )
        assert failing["bob"].creator == bob_id

        workflow = await ada.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_merge_workflow()))
        theirs = await bob.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
        in_theirs = await _run(bob, workflow.workflow_id, theirs.session_id)
        mine = await ada.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
        in_mine = await _run(ada, workflow.workflow_id, mine.session_id)
        outside = await _run(bob, workflow.workflow_id)  # bob's, outside sessions: the tenant's

        def completed(receiver: Receiver) -> set[str]:
            return {e["execution_id"] for e in receiver.events() if e["type"] == "execution.completed"}

        def failures(receiver: Receiver) -> list[str]:
            return sorted(e["data"]["webhook_id"] for e in receiver.events() if e["type"] == "webhook.failed")

        runs = {in_theirs.execution_id, in_mine.execution_id, outside.execution_id}
        expected_failures = sorted([failing["ada"].webhook_id] * 2 + [failing["bob"].webhook_id] * 2)

        async def admin_got_everything() -> bool:
            return completed(boss_seen) == runs and failures(boss_seen) == expected_failures

        # Everything is queued to every webhook at once: once the admin's has it all, the rest is queued too.
        await eventually(admin_got_everything, "the admin's webhook receives every run and every failure")
        for client, hook, state, receiver in (
            (ada, ada_hook, D.STATE_SUCCEEDED, ada_seen),
            (ada, failing["ada"], D.STATE_DEAD_LETTERED, ada_refuses),
            (bob, failing["bob"], D.STATE_DEAD_LETTERED, bob_refuses),
        ):
            await eventually(
                functools.partial(_all_delivered, client, hook.webhook_id, state, receiver),
                f"every delivery to {hook.webhook_id} attempted",
            )

        # Ada's webhook: events outside sessions and of her session, nothing of bob's session.
        got = ada_seen.events()
        assert not [e["type"] for e in got if e["session_id"] == theirs.session_id]
        assert completed(ada_seen) == {in_mine.execution_id, outside.execution_id}
        assert {e["type"] for e in got if e["session_id"] == mine.session_id} >= {
            "session.created",
            "execution.completed",
        }
        assert any(e["type"] == "workflow.created" and e["session_id"] == "" for e in got)
        # Of webhook failures, only those of her own webhooks.
        assert failures(ada_seen) == [failing["ada"].webhook_id] * 2
        assert completed(ada_refuses) == {in_mine.execution_id, outside.execution_id}
        assert completed(bob_refuses) == {in_theirs.execution_id, outside.execution_id}

        # The admin's webhook: every session's events of the tenant.
        every = boss_seen.events()
        for session in (theirs, mine):
            assert {e["type"] for e in every if e["session_id"] == session.session_id} >= {
                "session.created",
                "execution.started",
                "execution.completed",
            }


async def test_a_webhook_is_missing_for_another_credential_of_the_tenant(
    running: Running, receivers: Callable[..., Receiver]
) -> None:
    target = f"127.0.0.1:{running.port}"
    async with AsyncClient(target, api_key=ADMIN_KEY) as root:
        ada_id, ada_key = await _acme_key(root, "user")
        _bob_id, bob_key = await _acme_key(root, "user")
        _boss_id, boss_key = await _acme_key(root, "admin")
    url = receivers().url()
    async with (
        AsyncClient(target, api_key=ada_key) as ada,
        AsyncClient(target, api_key=bob_key) as bob,
        AsyncClient(target, api_key=boss_key) as boss,
    ):
        create = W.CreateWebhookRequest(webhook=W.Webhook(url=url, webhook_id="adas"), request_id="ada-create")
        hers = await ada.webhooks.CreateWebhook(create)
        await ada.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=W.Webhook(url=url, webhook_id="adas-old")))
        delete_old = W.DeleteWebhookRequest(webhook_id="adas-old", request_id="ada-delete")
        await ada.webhooks.DeleteWebhook(delete_old)
        his = await bob.webhooks.CreateWebhook(W.CreateWebhookRequest(webhook=W.Webhook(url=url)))

        async def missing(call: Awaitable[object], webhook_id: str) -> None:
            """The call fails as for a webhook that never existed."""
            error = await _error(call)
            assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND"), error.message
            assert error.metadata == {"webhook_id": webhook_id}

        for webhook_id in ("adas", "never"):
            await missing(bob.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id=webhook_id)), webhook_id)
            await missing(bob.webhooks.DeleteWebhook(W.DeleteWebhookRequest(webhook_id=webhook_id)), webhook_id)
            await missing(
                bob.webhooks.ListWebhookDeliveries(W.ListWebhookDeliveriesRequest(webhook_id=webhook_id)), webhook_id
            )
            await missing(
                bob.webhooks.RedeliverWebhookDelivery(
                    W.RedeliverWebhookDeliveryRequest(webhook_id=webhook_id, delivery_id="dlv_x")
                ),
                webhook_id,
            )
        # Ada's request ids from bob: never her webhook, nor a delete of hers replayed as done.
        await missing(bob.webhooks.DeleteWebhook(delete_old), "adas-old")
        reused = await _error(bob.webhooks.CreateWebhook(create))
        assert (reused.code(), reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
        assert "adas" not in reused.message
        listed = await bob.webhooks.ListWebhooks(W.ListWebhooksRequest())
        assert [w.webhook_id for w in listed.webhooks] == [his.webhook_id]

        # Ada: all of it works, and bob changed nothing.
        assert await ada.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id="adas")) == hers
        assert await ada.webhooks.CreateWebhook(create) == hers
        await ada.webhooks.DeleteWebhook(delete_old)  # her own repeat: replayed
        assert [w.webhook_id for w in (await ada.webhooks.ListWebhooks(W.ListWebhooksRequest())).webhooks] == ["adas"]
        await ada.webhooks.ListWebhookDeliveries(W.ListWebhookDeliveriesRequest(webhook_id="adas"))

        # The tenant's admin sees and manages every webhook of the tenant.
        every = await boss.webhooks.ListWebhooks(W.ListWebhooksRequest())
        assert sorted(w.webhook_id for w in every.webhooks) == sorted(["adas", his.webhook_id])
        assert (await boss.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id="adas"))).creator == ada_id
        await boss.webhooks.DeleteWebhook(W.DeleteWebhookRequest(webhook_id=his.webhook_id))
        await missing(bob.webhooks.GetWebhook(W.GetWebhookRequest(webhook_id=his.webhook_id)), his.webhook_id)


async def test_webhooks_from_before_are_tenant_wide_and_the_admins(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    old_receiver, bobs_receiver = receivers(), receivers()
    path = Settings.load({"data_dir": tmp_path}, environ={}).database_path
    before = await SqliteStore.open(path, [m for m in bundled() if m.name != "webhook_creators"])
    now = time.time_ns() // 1000
    old = W.Webhook(webhook_id="old", url=old_receiver.url(), tenant="default")
    old.create_time.FromMicroseconds(now)

    def register_old(conn: Connection) -> None:
        conn.execute(
            "INSERT INTO webhooks (tenant, webhook_id, create_us, secret, body) VALUES ('default', 'old', ?, NULL, ?)",
            (now, old.SerializeToString()),
        )

    await before._write(register_old)
    await before.close()
    async with running(tmp_path) as env:
        await _credential_session(env.store, "fpk_ada")
        await _credential_webhook(env.store, "bobs", bobs_receiver.url(), "fpk_bob")
        await env.dispatcher.webhooks_changed("default")
        in_session = env.bus.publish("execution.completed", tenant="default", session_id="ses_ada", execution_id="e1")
        outside = env.publish()

        async def delivered() -> bool:
            return {e["id"] for e in old_receiver.events()} == {in_session.id, outside.id} and (
                len(await env.deliveries("bobs", state=D.STATE_SUCCEEDED)) == 1
            )

        await eventually(delivered, "the webhook from before gets both events, bob's the one outside sessions")
        assert [e["id"] for e in bobs_receiver.events()] == [outside.id]
        assert [d.event_id for d in await env.deliveries("bobs")] == [outside.id]

        # Managed by the tenant's admins alone, as if an admin had registered it.
        assert (await env.store.get_webhook("default", "old")) == old
        assert await env.store.get_webhook("default", "old", creator="fpk_bob") is None
        assert [w.webhook_id for w in await env.store.list_webhooks("default", after=None, limit=10)] == ["bobs", "old"]
        mine = await env.store.list_webhooks("default", after=None, limit=10, creator="fpk_bob")
        assert [w.webhook_id for w in mine] == ["bobs"]
        assert await env.store.delete_webhook("default", "old", now, creator="fpk_bob") is Deletion.MISSING
        assert await env.store.get_webhook("default", "old") is not None


async def test_a_session_s_owner_is_looked_up_once_not_per_event(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    async with running(tmp_path) as env:
        await _credential_session(env.store, "fpk_ada")
        await _credential_webhook(env.store, "adas", receiver.url(), "fpk_ada")
        await env.dispatcher.webhooks_changed("default")
        # As in a process that did not create the session: its owner is not cached yet.
        env.store._session_owners = None
        lookups: list[str] = []
        lookup = env.store._lookup

        async def counted(sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
            if "creator FROM sessions" in sql:
                lookups.append(sql)
            return await lookup(sql, args)

        env.store._lookup = counted  # type: ignore[method-assign]
        for _flush in range(3):
            for _event in range(10):
                env.bus.publish("node.completed", tenant="default", session_id="ses_ada", execution_id="e1", data={})
            await asyncio.sleep(0)  # separate flushes, too

        async def delivered() -> bool:
            return len(await env.deliveries("adas", state=D.STATE_SUCCEEDED)) == 30

        await eventually(delivered, "thirty deliveries of the session's events")
        assert len(lookups) == 1


async def test_a_tenants_unfinished_deliveries_are_bounded_and_the_rest_dropped_and_counted(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    """Receivers that never answer keep each delivery through every retry: past the tenant's most of
    unfinished deliveries in the process, its new ones are dropped and counted, not queued; other
    tenants' deliveries go on, and once the backlog drains the tenant's are queued again."""
    hung = receivers(lambda n, seen: HANG)
    fine = receivers()
    async with running(tmp_path, tenant_max_pending_deliveries=5, webhook_concurrency_per_target=2) as env:
        greedy = await env.create(hung.url(), tenant="greedy", event_types=["execution.*"])
        await env.create(fine.url(), tenant="other", event_types=["execution.*"])
        for n in range(20):
            env.publish(tenant="greedy", n=n)

        async def two_in_flight() -> bool:
            return hung.in_flight == 2

        await eventually(two_in_flight, "the hung receiver's two connections")
        assert env.dispatcher.unfinished == 5
        stats = env.dispatcher.stats("greedy")
        assert (stats.dropped, env.dispatcher.stats().dropped) == (15, 15)
        assert len(await env.deliveries(greedy.webhook_id, tenant="greedy")) == 5, "dropped ones are not stored"

        env.publish(tenant="other", n=0)

        async def other_delivered() -> bool:
            return len(fine.events()) == 1

        await eventually(other_delivered, "the other tenant's delivery")
        assert env.dispatcher.stats("other").dropped == 0

        hung.release.set()

        async def drained() -> bool:
            return env.dispatcher.unfinished == 0

        await eventually(drained, "the backlog delivered")
        env.publish(tenant="greedy", n=99)

        async def queued_again() -> bool:
            return any(event["data"].get("n") == 99 for event in hung.events())

        await eventually(queued_again, "a new delivery once there is room")
        assert env.dispatcher.stats("greedy").dropped == 15


async def _credential_session(store: _Store, creator: str) -> None:
    """Session ses_ada of tenant default, made by `creator`, live for a minute."""
    now = now_us()
    session = session_pb2.Session(session_id="ses_ada", tenant="default", creator=creator)
    session.create_time.FromMicroseconds(now)
    session.expire_time.FromMicroseconds(now + 60_000_000)
    await store.create_session("default", session, None)


async def _credential_webhook(store: _Store, webhook_id: str, url: str, creator: str) -> None:
    """A webhook of tenant default registered by the non-admin credential `creator`: the events of
    its own sessions only."""
    hook = W.Webhook(webhook_id=webhook_id, url=url, tenant="default", creator=creator)
    hook.create_time.FromMicroseconds(now_us())
    await store.create_webhook("default", hook, b"", None, session_scope=creator)


class _StoreAway:
    """Makes `store`'s session owner lookups and delivery inserts fail as with its database away
    (StoreUnavailable), each while its flag is set."""

    def __init__(self, store: _Store) -> None:
        self.lookups = self.inserts = True
        lookup, insert = store._lookup, store.insert_deliveries

        async def looked_up(sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
            if self.lookups:
                raise StoreUnavailable("cannot connect to the database (tried a moment ago)")
            return await lookup(sql, args)

        async def inserted(rows: Any, **fields: Any) -> int:
            if self.inserts:
                raise StoreUnavailable("cannot connect to the database (tried a moment ago)")
            return await insert(rows, **fields)

        store._lookup = looked_up  # type: ignore[method-assign]
        store.insert_deliveries = inserted  # type: ignore[method-assign]


async def test_deliveries_the_store_cannot_take_yet_are_kept_within_the_tenants_cap(
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the store is unavailable, the deliveries of events published meanwhile are kept (the
    events while their sessions' owners cannot be looked up, then the rows while they cannot be
    written), counted against the tenant's most of unfinished deliveries, and written once it is
    back; the outage is said once, not per batch."""
    monkeypatch.setattr(webhook_dispatcher, "RETRY_UNAVAILABLE", 0.05)
    monkeypatch.setattr(periodic, "SETTLES", 0.2)
    admins, adas = receivers(), receivers()
    async with running(tmp_path, tenant_max_pending_deliveries=8) as env:
        await _credential_session(env.store, "fpk_ada")
        await _credential_webhook(env.store, "adas", adas.url(), "fpk_ada")
        await env.create(admins.url(), webhook_id="admins")  # the tenant's, every session's events
        env.store._session_owners = None  # as in a process that did not create the session
        away = _StoreAway(env.store)

        def publish(n: int) -> str:
            return env.bus.publish("node.completed", tenant="default", session_id="ses_ada", data={"n": n}).id

        with caplog.at_level(logging.INFO, logger=webhook_dispatcher.__name__):
            kept = [publish(0)]
            await asyncio.sleep(0.2)  # its session's owner cannot be looked up: kept as an event
            kept.append(publish(1))
            away.lookups = False
            await asyncio.sleep(0.2)  # looked up, but not written: kept as rows
            kept += [publish(2), publish(3)]  # two deliveries each: the tenant's eight
            for n in range(4, 10):
                publish(n)
            assert env.dispatcher.stats("default").dropped == 12
            assert env.dispatcher.unfinished == 0 and await env.deliveries("admins") == []
            away.inserts = False

            async def delivered() -> bool:
                return all(sorted(e["id"] for e in r.events()) == sorted(kept) for r in (admins, adas))

            await eventually(delivered, "the kept deliveries made once the store is back")
            await asyncio.sleep(0.5)  # the outage's end said
        lines = [r.getMessage() for r in caplog.records if r.name == webhook_dispatcher.__name__]
        assert lines == [
            "reading and writing webhook deliveries failed; will retry",
            "tenant default holds its most of 8 unfinished webhook deliveries in this process: new ones are dropped"
            " (its receivers are slow or down, or the store is unavailable; 2 dropped so far)",
            "queued 8 webhook deliveries kept while the store was unavailable",
            lines[-1],
        ], lines
        assert lines[-1].startswith("reading and writing webhook deliveries works again after")
        assert (env.dispatcher.lost, env.dispatcher.stats().dropped) == (0, 12)

        async def drained() -> bool:
            return env.dispatcher.unfinished == 0

        await eventually(drained, "every kept delivery finished")
        later = publish(10)  # room again

        async def queued_again() -> bool:
            return admins.events()[-1]["id"] == later

        await eventually(queued_again, "a new delivery once the store is back")


async def test_stopping_while_the_store_is_unavailable_loses_the_kept_deliveries_and_says_so_once(
    tmp_path: Path, receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receivers()
    metrics = Prometheus()
    async with running(tmp_path) as env:
        await env.create(receiver.url())
        await env.create(receiver.url(), tenant="other")
        env.dispatcher.prometheus = metrics
        _StoreAway(env.store)
        with caplog.at_level(logging.INFO, logger=webhook_dispatcher.__name__):
            for n in range(3):
                env.publish(n=n)
                await asyncio.sleep(0.05)
            env.publish(tenant="other")
            dispatcher = env.dispatcher
    lines = [r.getMessage() for r in caplog.records if r.name == webhook_dispatcher.__name__]
    assert lines == [
        "reading and writing webhook deliveries failed; will retry",
        "stopping with the store unavailable: 4 webhook deliveries could not be queued",
    ]
    assert dispatcher.lost == 4 and receiver.seen == []
    # Shown where the other outcomes are: GetStats (all, and each tenant's) and /metrics.
    assert (dispatcher.stats().lost, dispatcher.stats("default").lost, dispatcher.stats("other").lost) == (4, 3, 1)
    assert _deliveries_counted(metrics, "lost") == 4


async def test_deliveries_whose_rows_cannot_be_written_are_counted_lost(
    env: Env, receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails for another reason than the store being unavailable is not tried again:
    its deliveries are lost, logged and counted as such."""
    receiver = receivers()
    await env.create(receiver.url())
    await env.create(receiver.url())
    metrics = env.dispatcher.prometheus = Prometheus()

    async def broken(rows: Any, **fields: Any) -> int:
        raise RuntimeError("a bug")

    env.store.insert_deliveries = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger=webhook_dispatcher.__name__):
        env.publish()

        async def counted() -> bool:
            return env.dispatcher.lost == 2

        await eventually(counted, "the event's two deliveries counted lost")
    assert [r.getMessage() for r in caplog.records if r.name == webhook_dispatcher.__name__] == [
        "could not queue 2 webhook deliveries"
    ]
    assert (env.dispatcher.stats().lost, env.dispatcher.stats("default").lost) == (2, 2)
    assert (env.dispatcher.stats().dropped, env.dispatcher.stats("other").lost) == (0, 0)
    assert _deliveries_counted(metrics, "lost") == 2 and _deliveries_counted(metrics, "dropped") is None


@pytest.mark.parametrize("committed", [False, True], ids=["never-stored", "stored-before-the-error"])
async def test_kept_deliveries_whose_second_write_fails_are_made_if_stored_and_counted_lost_if_not(
    env: Env, receivers: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """Rows kept through an outage are written again; when that write fails for another reason it
    may still have committed, so they are tried: made when their row is there, counted lost when not."""
    monkeypatch.setattr(webhook_dispatcher, "RETRY_UNAVAILABLE", 0.05)
    receiver = receivers()
    await env.create(receiver.url())
    await env.create(receiver.url())
    real = env.store.insert_deliveries
    calls = 0

    async def outage_then_error(rows: Any, **fields: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("cannot connect to the database (tried a moment ago)")
        if committed:
            await real(rows, **fields)
        raise RuntimeError("the connection broke after the write")

    env.store.insert_deliveries = outage_then_error  # type: ignore[method-assign]
    env.publish()

    async def settled() -> bool:
        return env.dispatcher.unfinished == 0 and calls >= 2 and (len(receiver.events()) == 2 or env.dispatcher.lost)

    await eventually(settled, "the kept deliveries made or counted lost")
    if committed:
        assert (len(receiver.events()), env.dispatcher.lost) == (2, 0)
    else:
        assert (receiver.events(), env.dispatcher.lost) == ([], 2)


async def test_deliveries_lost_to_a_failed_owner_lookup_are_counted_once_when_the_batch_goes_round_again(
    tmp_path: Path, receivers: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner lookup that fails for a bug loses the scoped webhooks' deliveries of that event; when
    another lookup of the same batch finds the store unavailable, the batch is looked at again, and
    the loss must not be counted twice."""
    monkeypatch.setattr(webhook_dispatcher, "RETRY_UNAVAILABLE", 0.05)
    hers, admins = receivers(), receivers()
    async with running(tmp_path) as env:
        await _credential_webhook(env.store, "hers", hers.url(), "fpk_ada")
        await env.create(admins.url(), webhook_id="admins")
        away = [True]

        async def owner(tenant: str, session_id: str) -> str | None:
            if session_id == "ses_bug":
                raise RuntimeError("a bug")
            if away[0]:
                away[0] = False
                raise StoreUnavailable("cannot connect to the database (tried a moment ago)")
            return "fpk_ada"

        env.store.session_owner = owner  # type: ignore[method-assign]
        # One batch: published together, before the flusher runs.
        env.bus.publish("node.completed", tenant="default", session_id="ses_bug", data={})
        ok = env.bus.publish("node.completed", tenant="default", session_id="ses_ok", data={})

        async def delivered() -> bool:
            return [e["id"] for e in hers.events()] == [ok.id] and len(admins.events()) == 2

        await eventually(delivered, "the deliveries of the batch, looked at again")
        assert env.dispatcher.lost == 1, env.dispatcher.lost  # hers, of ses_bug's event: once


def _deliveries_counted(metrics: Prometheus, outcome: str) -> float | None:
    assert metrics.registry is not None
    return metrics.registry.get_sample_value("flowport_webhook_deliveries_total", {"outcome": outcome})


async def test_each_webhook_keeps_its_newest_finished_deliveries(env: Env, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    hook = await env.create(receiver.url(), event_types=["execution.*"])
    other = await env.create(receiver.url(), event_types=["session.*"])
    published = [env.publish(n=n).id for n in range(8)]
    env.publish("session.created")

    async def all_delivered() -> bool:
        return len(receiver.events()) == 9 and env.dispatcher.unfinished == 0

    await eventually(all_delivered, "nine deliveries")
    later = now_us() + 3_600_000_000
    assert await env.store.purge_deliveries_beyond(3, finished_since_us=later) == 0, (
        "no delivery finished since: no webhook is looked at"
    )
    capped: list[tuple[str, str]] = []
    assert await env.store.purge_deliveries_beyond(3, batch=2, capped=capped) == 2, "at most a batch per webhook"
    assert [webhook_id for _, webhook_id in capped] == [hook.webhook_id], "named as having more left"
    # Those with a delivery finished since (all of them here), in as many batches as asked.
    assert await env.store.purge_deliveries_beyond(3, batch=2, batches=2, finished_since_us=1) == 3
    assert await env.store.purge_deliveries_beyond(3) == 0
    kept = await env.deliveries(hook.webhook_id)
    assert sorted(d.event_id for d in kept) == sorted(published[5:]), "the newest three"
    assert len(await env.deliveries(other.webhook_id)) == 1
