"""HTTPRequestNode and RESTClientNode against a real HTTP server on 127.0.0.1,
plus the ${name} substitution they rely on."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from typing import Any

import httpx
import pytest

from flowport.server import egress
from flowport.server.egress import forbidden_address
from flowport.server.nodes import http as http_nodes
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.http import HTTPRequestNode, RESTClientNode, parse_retry_after
from flowport.server.nodes.rate_limited import RateLimitedAPINode
from flowport.server.nodes.substitution import references, substitute
from flowport.server.resolver import RESOLVING_FOR

LOOPBACK = frozenset({"127.0.0.1", "localhost"})

# -- a small local HTTP server ----------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, dict[str, str], bytes]
Route = Callable[[Seen, int], Reply]


def _json_reply(status: int, value: Any, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(value).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for seen in self.seen if seen.path.split("?", 1)[0] == path)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
        with self.server.lock:
            self.server.seen.append(seen)
            count = self.server.hits(self.path.split("?", 1)[0])
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            status, headers, body = _json_reply(404, {"error": "not found"})
        else:
            status, headers, body = route(seen, count)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers and not headers.get("X-No-Length"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch  # noqa: N815


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    big = b"x" * 2000
    srv.routes.update(
        {
            "/json": lambda seen, n: _json_reply(200, {"hello": "world"}),
            "/text": lambda seen, n: (200, {"Content-Type": "text/plain; charset=utf-8"}, "héllo".encode()),
            "/echo": lambda seen, n: _json_reply(
                200,
                {
                    "method": seen.method,
                    "path": seen.path,
                    "body": json.loads(seen.body) if seen.body else None,
                    "headers": seen.headers,
                },
            ),
            "/flaky": lambda seen, n: _json_reply(503, {"n": n}) if n <= 2 else _json_reply(200, {"n": n}),
            "/limited": lambda seen, n: (
                _json_reply(429, {}, **{"Retry-After": "2"}) if n == 1 else _json_reply(200, {})
            ),
            "/limited-long": lambda seen, n: _json_reply(429, {}, **{"Retry-After": "5"}),
            "/down": lambda seen, n: _json_reply(503, {"n": n}),
            "/slow": lambda seen, n: (srv.release.wait(10), _json_reply(200, {}))[1],
            "/big": lambda seen, n: (200, {"Content-Type": "text/plain"}, big),
            "/big-stream": lambda seen, n: (200, {"Content-Type": "text/plain", "X-No-Length": "1"}, big),
            "/not-json": lambda seen, n: (200, {"Content-Type": "text/plain"}, b"plain <b>text</b>"),
            "/redirect": lambda seen, n: (302, {"Location": "/json"}, b""),
            "/redirect-internal": lambda seen, n: (302, {"Location": "http://10.0.0.1/"}, b""),
            "/cookie": lambda seen, n: (200, {"Set-Cookie": "sid=secret; Path=/"}, b"ok"),
            # The same server under another host name is another origin.
            "/hop-away": lambda seen, n: (307, {"Location": f"http://localhost:{srv.port}/echo"}, b""),
            "/hop-here": lambda seen, n: (307, {"Location": "/echo"}, b""),
        }
    )
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as shared:
        yield shared


@pytest.fixture
def no_such_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names under `.invalid` do not resolve, as a resolver answers for them (EAI_NONAME), on
    every machine: one without a reachable DNS server would answer EAI_AGAIN instead, slowly."""
    resolve = egress.getaddrinfo

    async def answer(host: str, port: int) -> Any:
        if host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await resolve(host, port)

    monkeypatch.setattr(egress, "getaddrinfo", answer)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff delays the node asked for; nothing actually waits."""
    recorded: list[float] = []

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(http_nodes, "_sleep", fake_sleep)
    return recorded


def make_ctx(client: httpx.AsyncClient, *, timeout: float = 10.0, allowlist: frozenset[str] = LOOPBACK) -> NodeContext:
    return NodeContext(
        tenant="t1",
        execution_id="exe_1",
        node_id="call",
        attempt=1,
        timeout=timeout,
        services=NodeServices(http=client, http_allowlist=allowlist),
    )


async def run_http(ctx: NodeContext, **params: Any) -> dict[str, Any]:
    node = HTTPRequestNode()
    return await node.run(ctx, node.prepare(params), params)


async def run_rest(ctx: NodeContext, **params: Any) -> dict[str, Any]:
    node = RESTClientNode()
    return await node.run(ctx, node.prepare(params), params)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- HTTPRequestNode ----------------------------------------------------------


async def test_get_json(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_http(make_ctx(client), url=server.url("/json"))
    assert out["success"] is True
    assert out["status_code"] == 200
    response = out["response"]
    assert set(out) == {"response", "status_code", "success"}, "kept once: `result` is a connection alias"
    assert response["status_code"] == 200
    assert response["json"] == {"hello": "world"}
    assert json.loads(response["body"]) == {"hello": "world"}
    assert response["headers"]["content-type"] == "application/json"
    assert response["url"] == server.url("/json")
    assert response["attempts"] == 1
    assert set(response) == {"status_code", "headers", "body", "json", "url", "attempts"}
    assert server.seen[0].method == "GET"


async def test_text_body_is_not_parsed(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_http(make_ctx(client), url=server.url("/text"))
    assert out["response"]["body"] == "héllo"
    assert out["response"]["json"] is None


async def test_post_json_with_substitution_and_headers(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_http(
        make_ctx(client),
        url=f"http://127.0.0.1:{server.port}/echo?id=${{order.id}}",
        method="POST",
        headers={"Authorization": "Bearer ${api_token}", "X-Trace": "${trace}", "X-Literal": "$${not_a_ref}"},
        params={"page": "${page}", "tags": ["a", "b"]},
        body={"user": "${user}", "count": "${count}", "note": "n=${count}"},
        api_token="tok-1",
        trace="abc",
        order={"id": 42},
        page=2,
        user="ada",
        count=3,
    )
    assert out["success"] is True
    echoed = out["response"]["json"]
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo?id=42&page=2&tags=a&tags=b"
    assert echoed["body"] == {"user": "ada", "count": 3, "note": "n=3"}
    headers = echoed["headers"]
    assert headers["authorization"] == "Bearer tok-1"
    assert headers["x-trace"] == "abc"
    assert headers["x-literal"] == "${not_a_ref}"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("flowport/")


async def test_raw_data_body(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_http(
        make_ctx(client), url=server.url("/echo"), method="PUT", data='{"raw": "${x}"}', x="y",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert out["response"]["json"]["body"] == {"raw": "y"}


async def test_unresolved_reference_fails(server: _Server, client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=server.url("/json"), headers={"Authorization": "Bearer ${nope}"})
    assert caught.value.reason == "UNRESOLVED_REFERENCE"
    assert "nope" in caught.value.message
    assert server.seen == []


async def test_retries_on_503_then_succeeds(server: _Server, client: httpx.AsyncClient, sleeps: list[float]) -> None:
    out = await run_http(make_ctx(client), url=server.url("/flaky"), retry_attempts=3, retry_delay=0.01)
    assert out["success"] is True
    assert out["response"]["json"] == {"n": 3}
    assert out["response"]["attempts"] == 3
    assert server.hits("/flaky") == 3
    # Exponential backoff with jitter: 0.01 * 2**(n-1) scaled by 0.5..1.
    assert len(sleeps) == 2
    assert 0.005 <= sleeps[0] <= 0.01
    assert 0.01 <= sleeps[1] <= 0.02


async def test_429_honours_retry_after(server: _Server, client: httpx.AsyncClient, sleeps: list[float]) -> None:
    out = await run_http(make_ctx(client), url=server.url("/limited"), retry_attempts=2, retry_delay=0.01)
    assert out["success"] is True
    assert server.hits("/limited") == 2
    assert sleeps == [2.0]


async def test_retry_after_is_capped(server: _Server, client: httpx.AsyncClient, sleeps: list[float]) -> None:
    await run_http(make_ctx(client), url=server.url("/limited"), retry_attempts=1, max_retry_delay=0.5)
    assert sleeps == [0.5]


async def test_no_sleep_past_the_node_deadline(server: _Server, client: httpx.AsyncClient, sleeps: list[float]) -> None:
    # Retry-After 5s does not fit in a 2s node timeout: give up with the 429.
    out = await run_http(make_ctx(client, timeout=2.0), url=server.url("/limited-long"), retry_attempts=3)
    assert out["success"] is False
    assert out["status_code"] == 429
    assert out["response"]["attempts"] == 1
    assert sleeps == []
    assert server.hits("/limited-long") == 1


async def test_5xx_after_all_retries_is_unsuccessful_output(
    server: _Server, client: httpx.AsyncClient, sleeps: list[float]
) -> None:
    out = await run_http(make_ctx(client), url=server.url("/down"), retry_attempts=2, retry_delay=0.01)
    assert out["success"] is False
    assert out["status_code"] == 503
    assert out["response"]["attempts"] == 3
    assert server.hits("/down") == 3
    assert len(sleeps) == 2


async def test_404_is_not_retried(server: _Server, client: httpx.AsyncClient, sleeps: list[float]) -> None:
    out = await run_http(make_ctx(client), url=server.url("/nowhere"), retry_attempts=3)
    assert out["success"] is False
    assert out["status_code"] == 404
    assert out["response"]["json"] == {"error": "not found"}
    assert out["response"]["attempts"] == 1
    assert server.hits("/nowhere") == 1
    assert sleeps == []


async def test_connection_refused_raises_unreachable(client: httpx.AsyncClient, sleeps: list[float]) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=f"http://127.0.0.1:{unused_port()}/", retry_attempts=2, retry_delay=0.01)
    assert caught.value.reason == "HTTP_UNREACHABLE"
    assert caught.value.retryable is True
    assert "3 attempts" in caught.value.message
    assert len(sleeps) == 2


async def test_slow_server_times_out(server: _Server, client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=server.url("/slow"), timeout=0.3)
    assert caught.value.reason == "HTTP_TIMEOUT"
    assert caught.value.retryable is True
    assert server.hits("/slow") == 1


async def test_node_deadline_bounds_the_request(server: _Server, client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client, timeout=0.3), url=server.url("/slow"), timeout=30, retry_attempts=3)
    assert caught.value.reason == "HTTP_TIMEOUT"
    assert server.hits("/slow") == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/",
        "http://[::ffff:127.0.0.1]:9/",
        "http://0.0.0.0:9/",
    ],
)
async def test_private_targets_are_forbidden(client: httpx.AsyncClient, url: str) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=url, retry_attempts=3)
    assert caught.value.reason == "HTTP_TARGET_FORBIDDEN"
    assert caught.value.retryable is False


async def test_loopback_needs_the_allowlist(server: _Server, client: httpx.AsyncClient) -> None:
    for url in (server.url("/json"), f"http://localhost:{server.port}/json"):
        with pytest.raises(NodeError) as caught:
            await run_http(make_ctx(client, allowlist=frozenset()), url=url)
        assert caught.value.reason == "HTTP_TARGET_FORBIDDEN"
    assert server.seen == []
    out = await run_http(make_ctx(client), url=f"http://localhost:{server.port}/json")
    assert out["success"] is True


async def test_resolved_addresses_are_checked_and_pinned(
    server: _Server, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"api.example.test": ["127.0.0.1"], "mixed.example.test": ["93.184.216.34", "10.1.2.3"]}

    def fake_getaddrinfo(host: str, port: int, *args: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answers[host]]

    # The resolver's threads call it (server/resolver.py).
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    # The name is not allowlisted but its one address is: connect to that address, Host kept.
    ctx = make_ctx(client, allowlist=frozenset({"127.0.0.1"}))
    out = await run_http(ctx, url=f"http://api.example.test:{server.port}/echo")
    assert out["response"]["json"]["headers"]["host"] == f"api.example.test:{server.port}"
    assert out["response"]["url"] == f"http://api.example.test:{server.port}/echo"
    # One private address among public ones is enough to refuse, and the message does not say which.
    with pytest.raises(NodeError) as caught:
        await run_http(ctx, url="http://mixed.example.test/")
    refused = caught.value
    assert refused.reason == "HTTP_TARGET_FORBIDDEN" and refused.retryable is False
    assert "10.1.2.3" not in refused.message and "93.184.216.34" not in refused.message
    # A name that does not resolve fails the same way: a tenant cannot tell it from an internal one.
    with pytest.raises(NodeError) as caught:
        await run_http(ctx, url="http://nowhere.example.test/")
    assert (caught.value.reason, caught.value.retryable) == ("HTTP_TARGET_FORBIDDEN", False)
    assert caught.value.message.replace("nowhere", "mixed") == refused.message


@pytest.mark.usefixtures("no_such_names")
async def test_a_name_that_resolves_inside_reads_as_one_that_does_not_resolve(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    # A tenant must not map the internal names a gateway resolves: localhost (an internal
    # address) and a name that does not exist fail alike, neither naming an address nor the
    # resolver's error. The server log has both, with the tenant.
    acting = RESOLVING_FOR.set("t1")  # as the engine sets it for every node attempt (walk.py)
    errors: dict[str, NodeError] = {}
    try:
        with caplog.at_level(logging.INFO, logger=egress.__name__):
            for host in ("localhost", "nonexistent.invalid"):
                with pytest.raises(NodeError) as caught:
                    await run_http(make_ctx(client, allowlist=frozenset()), url=f"http://{host}:9/x", retry_attempts=2)
                errors[host] = caught.value
    finally:
        RESOLVING_FOR.reset(acting)
    shapes = {(e.reason, e.retryable, e.message.replace(host, "HOST")) for host, e in errors.items()}
    assert len(shapes) == 1, shapes
    [(reason, retryable, message)] = shapes
    assert (reason, retryable) == ("HTTP_TARGET_FORBIDDEN", False)
    assert message.startswith("target HOST ") and "(--http-allowlist, or --dev for loopback)" in message
    for leak in ("127.0.0.1", "::1", "Errno", "-2", "not known", "resolves to no"):
        assert leak not in message, leak
    assert sleeps == [], "neither is retried"
    logged = [r for r in caplog.records if r.name == egress.__name__]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.WARNING]
    inside, nowhere = (r.getMessage() for r in logged)
    assert "tenant t1" in inside and "localhost" in inside and "127.0.0.1" in inside
    assert "tenant t1" in nowhere and "nonexistent.invalid" in nowhere and "Errno" in nowhere


async def test_a_temporary_lookup_failure_is_retried_without_the_resolvers_error(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    def failing(host: str, *args: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client, allowlist=frozenset()), url="http://flaky.example.test/", retry_attempts=2)
    assert (caught.value.reason, caught.value.retryable) == ("HTTP_UNREACHABLE", True)
    assert caught.value.message == (
        "cannot resolve flaky.example.test right now: the name lookup failed temporarily (after 3 attempts)"
    )
    assert len(sleeps) == 2


async def test_an_address_given_as_such_is_named(client: httpx.AsyncClient) -> None:
    # Nothing to hide: the tenant wrote it.
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client, allowlist=frozenset()), url="http://10.0.0.1/")
    assert caught.value.message == (
        "target 10.0.0.1 is a private, loopback or otherwise internal address and not allowlisted "
        "(--http-allowlist, or --dev for loopback)"
    )


INTERNAL_ADDRESSES = (
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "169.254.169.254",
    "0.0.0.0",  # noqa: S104 - an address to refuse, not to bind
    "224.0.0.1",
    "100.64.0.1",
    "::1",
    "fe80::1",
    "fc00::1",
    "::ffff:10.0.0.1",
    "2002:0a00:0001::1",
    "::",
)


def test_forbidden_address_ranges() -> None:
    for text in INTERNAL_ADDRESSES:
        assert forbidden_address(ip_address(text)), text
    for text in ("8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"):
        assert not forbidden_address(ip_address(text)), text


async def test_response_size_cap(server: _Server, client: httpx.AsyncClient) -> None:
    for path in ("/big", "/big-stream"):
        with pytest.raises(NodeError) as caught:
            await run_http(make_ctx(client), url=server.url(path), max_response_bytes=1000)
        assert caught.value.reason == "HTTP_RESPONSE_TOO_LARGE", path
    out = await run_http(make_ctx(client), url=server.url("/big"), max_response_bytes=2000)
    assert len(out["response"]["body"]) == 2000
    head = await run_http(make_ctx(client), url=server.url("/big"), method="HEAD", max_response_bytes=1000)
    assert head["success"] is True
    assert head["response"]["body"] == ""


async def test_expect_json(server: _Server, client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=server.url("/not-json"), expect_json=True)
    assert caught.value.reason == "HTTP_INVALID_JSON"
    out = await run_http(make_ctx(client), url=server.url("/json"), expect_json=False)
    assert out["response"]["json"] is None


async def test_redirects(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_http(make_ctx(client), url=server.url("/redirect"))
    assert out["status_code"] == 302
    assert out["success"] is False
    assert out["response"]["headers"]["location"] == "/json"
    followed = await run_http(make_ctx(client), url=server.url("/redirect"), follow_redirects=True)
    assert followed["success"] is True
    assert followed["response"]["url"] == server.url("/json")
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=server.url("/redirect-internal"), follow_redirects=True)
    assert caught.value.reason == "HTTP_TARGET_FORBIDDEN"


async def test_credentials_stay_with_their_origin_on_a_redirect(server: _Server, client: httpx.AsyncClient) -> None:
    credentials = {"Authorization": "Bearer tok", "Cookie": "sid=1", "X-API-Key": "k1"}
    headers = {**credentials, "X-Trace": "t1"}
    # Same origin: everything is kept.
    here = await run_http(make_ctx(client), url=server.url("/hop-here"), headers=headers, follow_redirects=True)
    kept = here["response"]["json"]["headers"]
    assert {name: kept.get(name.lower()) for name in headers} == headers
    # Another origin: the credentials set for the first one are dropped, the rest kept; the body
    # a 307 re-sends is framed by the client, and Host is the new target's alone.
    away = await run_http(
        make_ctx(client),
        url=server.url("/hop-away"),
        method="POST",
        body={"a": 1},
        headers=headers,
        follow_redirects=True,
    )
    assert away["response"]["url"] == f"http://localhost:{server.port}/echo"
    landed = away["response"]["json"]
    assert not {name.lower() for name in credentials} & set(landed["headers"]), landed["headers"]
    assert landed["headers"]["x-trace"] == "t1"
    assert landed["body"] == {"a": 1}
    assert landed["headers"]["host"] == f"localhost:{server.port}"
    assert "transfer-encoding" not in landed["headers"]


async def test_cookies_do_not_leak_between_calls(server: _Server, client: httpx.AsyncClient) -> None:
    await run_http(make_ctx(client), url=server.url("/cookie"))
    out = await run_http(make_ctx(client), url=server.url("/echo"))
    assert "cookie" not in out["response"]["json"]["headers"]


async def test_bad_parameters(server: _Server, client: httpx.AsyncClient) -> None:
    cases: list[dict[str, Any]] = [
        {"url": server.url("/json"), "headers": {"X-Evil": "a\r\nX-Injected: 1"}},
        {"url": server.url("/json"), "method": "TRACE"},
        {"url": server.url("/json"), "timeout": "soon"},
        {"url": server.url("/json"), "body": {"a": 1}, "data": "x"},
        {"url": "ftp://127.0.0.1/file"},
    ]
    for params in cases:
        with pytest.raises(NodeError) as caught:
            await run_http(make_ctx(client), **params)
        assert caught.value.reason in {"INVALID_PARAMETER", "HTTP_INVALID_URL"}, params
    assert server.seen == []


async def test_header_values_http_cannot_carry_fail_cleanly(server: _Server, client: httpx.AsyncClient) -> None:
    # httpx would raise UnicodeEncodeError quoting the character (and h11 the whole value): never shown here.
    for value, shown in (("Jos\u00e9 Garc\u00eda", "\u00e9"), ("a\x01b", "\x01"), ("padded ", "padded")):
        for node, params in (
            (run_http, {"url": server.url("/json"), "headers": {"X-Name": value}}),
            # "Bearer <token>": a token ending in a space makes the header value end in one.
            (run_rest, {"base_url": server.url(""), "resource": "json", "auth_type": "bearer", "auth_token": value}),
        ):
            with pytest.raises(NodeError) as caught:
                await node(make_ctx(client), **params)
            assert caught.value.reason == "INVALID_PARAMETER", caught.value.message
            message = caught.value.message
            assert message.startswith(("header X-Name ", "header Authorization ")), message
            assert shown not in message and repr(shown).strip("'") not in message, message
    assert server.seen == []
    # A tab inside a value is fine.
    out = await run_http(make_ctx(client), url=server.url("/echo"), headers={"X-Tabbed": "a\tb"})
    assert out["response"]["json"]["headers"]["x-tabbed"] == "a\tb"


CLIENT_OWNED = (
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Keep-Alive",
    "Upgrade",
    "TE",
    "Trailer",
    "Proxy-Connection",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "Expect",
)


@pytest.mark.parametrize("name", [*CLIENT_OWNED, "transfer-encoding", "HOST", "cOnTeNt-LeNgTh"])
async def test_headers_the_client_owns_are_refused_at_run_time(
    server: _Server, client: httpx.AsyncClient, name: str
) -> None:
    # What a stored workflow, an input or a connection may still bring: refused before anything is sent.
    for node, params in (
        (run_http, {"url": server.url("/echo"), "method": "POST", "body": {"a": 1}, "headers": {name: "${v}"}}),
        (run_rest, {"base_url": server.url(""), "resource": "echo", "default_headers": {name: "x"}}),
        (run_rest, {"base_url": server.url(""), "resource": "echo", "headers": {name: "x"}}),
        (run_rest, {"base_url": server.url(""), "auth_type": "api_key", "auth_token": "k", "api_key_header": name}),
    ):
        with pytest.raises(NodeError) as caught:
            await node(make_ctx(client), **params, v="chunked")
        assert caught.value.reason == "INVALID_PARAMETER", caught.value.message
        assert caught.value.message.startswith(f"header {name} is set by the HTTP client"), caught.value.message
    assert server.seen == []


async def test_a_callers_framing_headers_never_reach_the_wire(client: httpx.AsyncClient) -> None:
    # The finding: Transfer-Encoding from the caller went out next to the client's Content-Length,
    # and Host as given. Read what arrives on the socket itself (an HTTP server would merge them).
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def answer() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            received.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    config = {"url": url, "method": "POST", "body": {"a": 1}}
    node = HTTPRequestNode()
    try:
        for headers in ({"Transfer-Encoding": "chunked"}, {"Host": "internal.admin"}):
            with pytest.raises(NodeError) as caught:
                # The whole headers object from an input or a connection, not the config.
                await node.run(make_ctx(client), node.prepare(config), {**config, "headers": headers})
            assert caught.value.reason == "INVALID_PARAMETER"
        # A plain request still goes out framed by the client alone.
        out = await node.run(make_ctx(client), node.prepare(config), dict(config))
        assert out["success"] is True
    finally:
        thread.join(timeout=5)
        listener.close()
    [request] = received
    head = request.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert b"transfer-encoding: chunked" not in head
    assert [line for line in head if line.startswith(b"host:")] == [f"host: 127.0.0.1:{port}".encode()]
    assert sum(line.startswith(b"content-length:") for line in head) == 1


@pytest.mark.parametrize("name", ["X-A\n", "X A", "X:A", "X-A\r\nX-B", "X\x00", "Caf\u00e9", ""])
async def test_header_names_that_are_not_tokens_are_refused(
    server: _Server, client: httpx.AsyncClient, name: str
) -> None:
    with pytest.raises(NodeError) as caught:
        await run_http(make_ctx(client), url=server.url("/echo"), headers={name: "v"})
    assert caught.value.reason == "INVALID_PARAMETER"
    message = caught.value.message
    assert "is not a valid HTTP header name" in message, message
    assert "\n" not in message and "\r" not in message and "\x00" not in message, message
    assert server.seen == []


async def test_missing_http_client() -> None:
    ctx = NodeContext("t", "e", "n", 1, 5.0, NodeServices())
    with pytest.raises(NodeError) as caught:
        await run_http(ctx, url="http://example.com/")
    assert caught.value.reason == "HTTP_CLIENT_UNAVAILABLE"


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# -- RESTClientNode -----------------------------------------------------------


async def test_rest_bearer_auth_and_resource(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_rest(
        make_ctx(client),
        base_url=f"http://127.0.0.1:{server.port}/",
        resource="echo",
        auth_type="bearer",
        auth_token="${enterprise_api_key}",
        default_headers={"Accept": "application/json", "X-Client-ID": "flowport"},
        headers={"X-Client-ID": "override"},
        params={"q": "${q}"},
        enterprise_api_key="ek-123",
        q="find me",
    )
    assert out["success"] is True
    echoed = out["response"]["json"]
    assert echoed["path"] == "/echo?q=find+me"
    assert echoed["headers"]["authorization"] == "Bearer ek-123"
    assert echoed["headers"]["accept"] == "application/json"
    assert echoed["headers"]["x-client-id"] == "override"


async def test_rest_basic_auth(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_rest(
        make_ctx(client), base_url=server.url(""), path="/echo", auth_type="basic", username="ada", password="p:w"
    )
    expected = "Basic " + base64.b64encode(b"ada:p:w").decode()
    assert out["response"]["json"]["headers"]["authorization"] == expected


async def test_rest_api_key_and_post(server: _Server, client: httpx.AsyncClient) -> None:
    out = await run_rest(
        make_ctx(client),
        base_url=server.url("/"),
        resource="echo",
        method="POST",
        auth_type="api_key",
        auth_token="k1",
        api_key_header="X-Key",
        body={"id": "${id}"},
        id=7,
    )
    echoed = out["response"]["json"]
    assert echoed["headers"]["x-key"] == "k1"
    assert "authorization" not in echoed["headers"]
    assert echoed["body"] == {"id": 7}


async def test_rest_shares_retries(server: _Server, client: httpx.AsyncClient, sleeps: list[float]) -> None:
    out = await run_rest(make_ctx(client), base_url=server.url(""), resource="flaky", retry_attempts=2, retry_delay=0)
    assert out["success"] is True
    assert server.hits("/flaky") == 3


# -- config validation --------------------------------------------------------


def test_http_config_validation() -> None:
    assert HTTPRequestNode.validate_config({"url": "https://api.example.com", "timeout": 5}, "nodes[0].config") == []
    missing = HTTPRequestNode.validate_config({}, "nodes[0].config")
    assert [path for path, _ in missing] == ["nodes[0].config.url"]
    wrong = HTTPRequestNode.validate_config({"url": "https://x", "timeout": "fast"}, "nodes[0].config")
    assert [path for path, _ in wrong] == ["nodes[0].config.timeout"]
    bad_method = HTTPRequestNode.validate_config({"url": "https://x", "method": "TRACE"}, "nodes[0].config")
    assert [path for path, _ in bad_method] == ["nodes[0].config.method"]
    header = HTTPRequestNode.validate_config({"url": "https://x", "headers": {"A": 1}}, "nodes[0].config")
    assert [path for path, _ in header] == ["nodes[0].config.headers.A"]
    typo = HTTPRequestNode.validate_config({"url": "https://x", "retries": 3}, "nodes[0].config")
    assert len(typo) == 1
    assert "retries" in typo[0][1]
    seed = {
        "url": "https://api.partner-system.com/v1/data",
        "method": "GET",
        "headers": {"Authorization": "Bearer ${api_token}", "User-Agent": "KailashSDK/1.0"},
        "timeout": 30,
        "retry_attempts": 3,
        "retry_delay": 2,
    }
    assert HTTPRequestNode.validate_config(seed, "nodes[0].config") == []


def test_headers_no_request_may_carry_are_refused_at_validation() -> None:
    for node_type in (HTTPRequestNode, RateLimitedAPINode):
        config: dict[str, Any] = {
            "url": "https://x",
            "rate_limit": {"max_requests": 1, "time_window": 1},
            "headers": {"Host": "internal.admin", "transfer-encoding": "chunked", "X-Ok": "Bearer ${t}"},
        }
        if node_type is HTTPRequestNode:
            del config["rate_limit"]
        problems = dict(node_type.validate_config(config, "nodes[0].config"))
        assert set(problems) == {"nodes[0].config.headers.Host", "nodes[0].config.headers.transfer-encoding"}
        assert "set by the HTTP client" in problems["nodes[0].config.headers.Host"]
    rest = {
        "base_url": "https://x",
        "auth_type": "api_key",
        "auth_token": "k",
        "api_key_header": "Connection",
        "default_headers": {"Keep-Alive": "1"},
        "headers": {"Proxy-Authorization": "Basic x", "Upgrade": "h2c"},
    }
    assert {path for path, _ in RESTClientNode.validate_config(rest, "nodes[1].config")} == {
        "nodes[1].config.api_key_header",
        "nodes[1].config.default_headers.Keep-Alive",
        "nodes[1].config.headers.Proxy-Authorization",
        "nodes[1].config.headers.Upgrade",
    }


def test_invalid_header_names_and_values_are_refused_at_validation() -> None:
    config = {"url": "https://x", "headers": {"X-Injected\r\nHost": "a", "X-Split": "a\r\nHost: internal.admin"}}
    problems = HTTPRequestNode.validate_config(config, "nodes[0].config")
    assert [path for path, _ in problems] == ["nodes[0].config.headers", "nodes[0].config.headers.X-Split"]
    name, value = problems[0][1], problems[1][1]
    assert name.startswith("'X-Injected\\r\\nHost' is not a valid HTTP header name"), name
    assert value.startswith("the value holds a line break"), value
    assert "internal.admin" not in value  # a value is never quoted: it may be a credential
    # A reference is filled in when the node runs, and checked then.
    assert HTTPRequestNode.validate_config({"url": "https://x", "headers": {"X-A": "${v}"}}, "c") == []


def test_rest_config_validation() -> None:
    seed = {
        "base_url": "https://api.enterprise-system.com",
        "auth_type": "bearer",
        "auth_token": "${enterprise_api_key}",
        "default_headers": {"Accept": "application/json", "X-Client-ID": "kailash-enterprise"},
    }
    assert RESTClientNode.validate_config(seed, "nodes[1].config") == []
    no_token = RESTClientNode.validate_config({"base_url": "https://x", "auth_type": "bearer"}, "nodes[1].config")
    assert [path for path, _ in no_token] == ["nodes[1].config.auth_token"]
    no_base = RESTClientNode.validate_config({}, "nodes[1].config")
    assert [path for path, _ in no_base] == ["nodes[1].config.base_url"]


def test_node_metadata() -> None:
    for cls in (HTTPRequestNode, RESTClientNode):
        assert cls.retry_safe is False
        assert set(cls.output_names()) == {"response", "result", "status_code", "success"}
        assert cls.open_inputs is True
        assert "url" in cls.input_names() or "base_url" in cls.input_names()


# -- substitution ---------------------------------------------------------------


def test_substitute() -> None:
    params: dict[str, Any] = {"n": 3, "name": "ada", "session": {"tenant_id": "acme", "tags": ["x", "y"]}}
    assert substitute("${n}", params) == 3
    assert substitute("n=${n}", params) == "n=3"
    assert substitute("${session.tenant_id}", params) == "acme"
    assert substitute("${session.tags.1}", params) == "y"
    assert substitute("${session}", params) == {"tenant_id": "acme", "tags": ["x", "y"]}
    assert substitute({"a": ["${name}", {"b": "${ n }"}], "k": 1}, params) == {"a": ["ada", {"b": 3}], "k": 1}
    assert substitute("$${name} and ${name}", params) == "${name} and ada"
    assert substitute("$${name}", params) == "${name}"
    assert substitute("${secret:API_KEY}", params) == "${secret:API_KEY}"
    assert substitute("Bearer ${secret:API_KEY}", params) == "Bearer ${secret:API_KEY}"
    assert substitute("cost $5 {x}", params) == "cost $5 {x}"
    # Substituted values are not searched again.
    assert substitute("${v}", {"v": "${n}"}) == "${n}"
    assert substitute("a${v}", {"v": "${n}"}) == "a${n}"
    with pytest.raises(NodeError) as caught:
        substitute({"x": "hello ${session.missing}"}, params)
    assert caught.value.reason == "UNRESOLVED_REFERENCE"
    assert "session.missing" in caught.value.message
    assert references({"a": "${x} ${y.z}", "b": ["${x}", "$${w}", "${secret:S}"]}) == ["x", "y.z"]


async def test_substitution_cannot_make_a_request_or_a_string_past_its_bound() -> None:
    """References multiply what they refer to: ["${x}"] * n keeps one value n times by reference
    (small in memory, huge as JSON), and "${x}${x}..." builds one long string. Both are refused
    before they are built, naming the bound."""
    long_value, target = "x" * 1024, "http://127.0.0.1:9/x"  # never reached
    async with httpx.AsyncClient() as client:
        with pytest.raises(NodeError) as caught:
            await run_http(make_ctx(client), url=target, method="POST", json=["${v}"] * 150_000, v=long_value)
        assert caught.value.reason == "REQUEST_TOO_LARGE" and "16777216 bytes" in caught.value.message
        with pytest.raises(NodeError) as caught:
            await run_http(make_ctx(client), url=target, method="POST", data="${v}" * 20_000, v=long_value)
        assert caught.value.reason == "SUBSTITUTION_TOO_LARGE"


class _CountedList(list[Any]):
    """A list whose str() calls are counted."""

    written = 0

    def __str__(self) -> str:
        type(self).written += 1
        return super().__str__()


def test_a_nodes_parameters_share_one_substitution_budget() -> None:
    """Each parameter within the bound is not enough either: an HTTP node's url, headers, query and
    body count toward one budget for the node (a SQL node's binds too: test_sql_nodes)."""
    big = _CountedList([1] * 1_000_000)  # 3 MB written out
    _CountedList.written = 0
    headers = {f"x-h{n}": "a${big}" for n in range(3)}
    query = {f"q{n}": "a${big}" for n in range(3)}
    with pytest.raises(NodeError) as caught:
        HTTPRequestNode().call({"url": "http://127.0.0.1:9/x", "headers": headers, "params": query, "big": big})
    assert caught.value.reason == "SUBSTITUTION_TOO_LARGE" and _CountedList.written == 6, _CountedList.written


def test_one_substitution_bounds_all_its_strings_together_and_measures_a_value_before_writing_it() -> None:
    """Each string within the bound is not enough: 200 strings each holding a 3 MB input (a list of a
    million numbers) made 600 MB. The strings of one value count together, so the sixth is refused
    before it is made; and a value past what is left is refused before str() writes it out."""
    big = _CountedList([1] * 1_000_000)  # 3 MB written out
    _CountedList.written = 0
    with pytest.raises(NodeError) as caught:
        substitute(["a${big}"] * 200, {"big": big})
    assert caught.value.reason == "SUBSTITUTION_TOO_LARGE" and "16777216" in caught.value.message
    assert _CountedList.written == 6, _CountedList.written  # the sixth passes 16 Mi characters
    huge = _CountedList(["x" * 1000] * 20_000)  # 20 M characters, one string held 20,000 times
    _CountedList.written = 0
    with pytest.raises(NodeError, match="would pass"):
        substitute("a${huge}", {"huge": huge})
    assert _CountedList.written == 0


@pytest.mark.timeout(60)
def test_references_of_a_large_config_are_found_in_linear_time() -> None:
    """20,000 references nested 30 lists deep: a list searched at each name and at each level took
    minutes (the test's timeout bounds it); found once each, in order."""
    value: Any = "".join(f"${{a{n}}}" for n in range(20_000))
    for _ in range(30):
        value = [value, "${a0}"]
    found = references({"json": value, "again": ["${a19999}", "${b}"]})
    assert found == [f"a{n}" for n in range(20_000)] + ["b"]
