"""Envoy's edge through a real Envoy and server: JSON errors and local
replies, no grpc-* headers on REST, body caps, CORS, streams as SSE and
NDJSON (also in headless Chromium), grpc-web, the OpenAPI document and
operations (access log, Prometheus stats)."""

from __future__ import annotations

import functools
import json
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import httpx
import pytest

from flowport.clients import ApiError, Client
from flowport.v1 import session_pb2, session_pb2_grpc

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, Stack, free_port, make_settings, start_up, stop_up
from ..gate import Gate

pytestmark = pytest.mark.integration
ALLOWED = "http://allowed.test"
PAGE_PORT = free_port()
PAGE_ORIGIN = f"http://127.0.0.1:{PAGE_PORT}"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = make_settings(
        tmp_path_factory.mktemp("edge"),
        cors_origins=f"{ALLOWED},{PAGE_ORIGIN}",
        max_request_bytes=64 * 1024,
        stream_heartbeat=1.0,
    )
    stack = start_up(settings)
    yield stack
    stop_up(stack)


@pytest.fixture
def http(edge: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.http, timeout=30, headers=ADMIN_HEADERS) as client:
        yield client


def _status(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) >= {"code", "message"}, body
    return body


def _slow_workflow(http: httpx.Client, name: str, seconds: float) -> None:
    code = f"import time\ntime.sleep({seconds})\nresult = 1"
    response = http.post(
        "/api/workflows",
        json={"name": name, "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": code}}]},
    )
    assert response.status_code == 200, response.text


def test_unknown_paths_and_query_parameters_answer_json(http: httpx.Client) -> None:
    missing = http.get("/api/no-such-thing")
    assert missing.status_code == 404 and _status(missing)["code"] == 5
    unknown = http.get("/api/sessions", params={"bogus": "1"})
    assert unknown.status_code == 400
    assert "bogus" in _status(unknown)["message"]


def test_a_query_refused_for_a_field_given_twice_carries_cors_headers_as_other_400s(http: httpx.Client) -> None:
    # Refused after the cors filter (by body_fields.lua), as the transcoder's own 400s: a page of
    # an allowed origin can read why.
    for query in ("bogus=1", "page_size=1&page_size=2"):
        response = http.get(f"/api/sessions?{query}", headers={"origin": ALLOWED})
        assert response.status_code == 400, response.text
        assert response.headers.get("access-control-allow-origin") == ALLOWED, (query, response.headers)


def test_malformed_json_is_400_json_naming_the_problem(http: httpx.Client) -> None:
    response = http.post("/api/sessions", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    body = _status(response)
    assert body["code"] == 3 and body["message"]


def test_a_body_over_the_cap_is_413_json(http: httpx.Client) -> None:
    response = http.post("/api/sessions", json={"user_id": "u", "metadata": {"blob": "x" * 100_000}})
    assert response.status_code == 413
    assert _status(response)["details"][0]["reason"] == "REQUEST_TOO_LARGE"


def test_rest_responses_carry_no_grpc_headers(http: httpx.Client) -> None:
    for response in (http.get("/health"), http.get("/api/sessions/ses_missing"), http.get("/nope")):
        grpc_headers = [h for h in response.headers if h.lower().startswith("grpc-")]
        assert grpc_headers == [], (response.status_code, grpc_headers)


def test_native_grpc_through_envoy_keeps_its_status(edge: Stack) -> None:
    with Client(edge.envoy_target, api_key=ADMIN_KEY) as client, pytest.raises(grpc.RpcError) as caught:
        client.sessions.GetSession(session_pb2.GetSessionRequest(session_id="ses_missing"))
    error = ApiError.from_rpc_error(caught.value)
    assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    with Client(edge.envoy_target, api_key=ADMIN_KEY) as client, pytest.raises(grpc.RpcError) as unknown:
        client.channel.unary_unary("/flowport.v1.Nope/Nothing")(b"", timeout=5)
    assert unknown.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)  # type: ignore[attr-defined]


def test_cors_preflight_allowed_and_denied(edge: Stack, http: httpx.Client) -> None:
    def upstream_requests() -> int:
        stats = httpx.get(
            f"http://127.0.0.1:{edge.settings.admin_port}/stats",
            params={"filter": "cluster.flowport_grpc.upstream_rq_total$"},
        ).text
        return int(stats.split(":")[1])

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"}
    allowed = http.options("/api/sessions", headers={"Origin": ALLOWED, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "x-api-key" in allowed.headers["access-control-allow-headers"]
    before = upstream_requests()
    denied = http.options("/api/sessions", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in denied.headers
    assert upstream_requests() == before, "a denied preflight must not reach the server"
    simple = http.get("/health", headers={"Origin": ALLOWED})
    assert simple.headers["access-control-allow-origin"] == ALLOWED
    assert "x-ratelimit-remaining" in simple.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": "http://evil.test"}).headers


def test_event_stream_as_ndjson_and_sse(http: httpx.Client) -> None:
    _slow_workflow(http, "events_ndjson", 0.2)
    started = http.post("/api/executions", json={"workflow_id": "events_ndjson", "wait": True}).json()
    query = {"execution_id": started["execution_id"], "after_id": "0", "types": "execution.*"}
    for accept in ("application/json", "text/event-stream"):
        with http.stream("GET", "/events", params=query, headers={"Accept": accept}) as response:
            assert response.status_code == 200
            lines = []
            for line in response.iter_lines():
                # SSE's id: and event: lines are covered in test_stream_edge; heartbeats open every stream.
                if line.strip() and not line.startswith(("id: ", "event: ")):
                    event = json.loads(line.removeprefix("data: "))
                    if event["type"] != "heartbeat":
                        lines.append(event)
                if lines and lines[-1].get("type") == "execution.completed":
                    break
        types = [e["type"] for e in lines]
        assert types[0] == "execution.started" and types[-1] == "execution.completed"
        assert all(t.startswith("execution.") for t in types)
        assert all(e["id"] for e in lines), "ids let a client resume"


def test_streams_as_server_sent_events_and_ndjson(http: httpx.Client) -> None:
    with Gate() as gate:
        # The run waits at the gate until its watch has begun, however slow the machine.
        workflow = {"name": "streamed", "nodes": [gate.node()]}
        assert http.post("/api/workflows", json=workflow).status_code == 200
        for accept, content_type in (
            ("text/event-stream", "text/event-stream"),
            ("application/json", "application/json"),
        ):
            gate.release.clear()
            started = http.post("/api/executions", json={"workflow_id": "streamed"}).json()
            lines = []
            with http.stream(
                "GET", f"/api/executions/{started['execution_id']}:watch", headers={"Accept": accept}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith(content_type)
                for line in response.iter_lines():
                    if line.strip():
                        lines.append(line)
                        gate.release.set()  # the watch is open: let the run end
            if accept == "text/event-stream":
                assert all(line.startswith(("data: ", "id: ", "event: heartbeat")) for line in lines), lines
                lines = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            messages = [json.loads(line) for line in lines]
            assert messages[0]["execution"]["execution_id"] == started["execution_id"]
            assert messages[0]["execution"]["state"] == "STATE_RUNNING", messages[0]
            assert messages[-1]["event"]["type"] == "execution.completed"


def test_idle_streams_get_heartbeats_and_no_route_timeout(http: httpx.Client) -> None:
    # Longer than a heartbeat interval (1s here): the stream stays open and beats.
    _slow_workflow(http, "quiet", 2.5)
    started = http.post("/api/executions", json={"workflow_id": "quiet"}).json()
    with http.stream("GET", f"/api/executions/{started['execution_id']}:watch") as response:
        types = [json.loads(line).get("event", {}).get("type") for line in response.iter_lines() if line.strip()]
    assert "heartbeat" in types
    assert types[-1] == "execution.completed"


def test_grpc_web_on_the_same_port(edge: Stack) -> None:
    request = session_pb2.GetSessionRequest(session_id="ses_missing").SerializeToString()
    frame = struct.pack(">BI", 0, len(request)) + request
    response = httpx.post(
        f"{edge.http}/flowport.v1.SessionService/GetSession",
        content=frame,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **ADMIN_HEADERS},
        timeout=10,
    )
    assert response.status_code == 200
    status = response.headers.get("grpc-status")
    if status is None:  # the status came in a trailer frame
        body = response.content
        assert body[0] & 0x80, "a grpc-web trailer frame"
        trailers = body[5:].decode()
        status = next(
            line.split(":", 1)[1].strip() for line in trailers.split("\r\n") if line.startswith("grpc-status")
        )
    assert status == str(grpc.StatusCode.NOT_FOUND.value[0])


def test_openapi_document_is_served_and_valid(http: httpx.Client) -> None:
    from openapi_spec_validator import validate

    response = http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document == json.loads((Path(__file__).parents[2] / "transcoder" / "openapi.json").read_text())
    assert "/api/sessions/{session_id}" in document["paths"]


def test_access_log_and_prometheus_stats(edge: Stack, http: httpx.Client) -> None:
    http.get("/api/sessions", headers={"user-agent": "access-log-probe"})
    log = edge.settings.data_dir / "access.log"
    deadline = time.monotonic() + 10
    entries: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any(e.get("user_agent") == "access-log-probe" for e in entries):
        time.sleep(0.2)  # Envoy flushes its access log on a timer
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    probe = next(e for e in entries if e.get("user_agent") == "access-log-probe")
    assert probe["path"] == "/api/sessions" and probe["status"] == 200
    metrics = httpx.get(f"http://127.0.0.1:{edge.settings.admin_port}/stats/prometheus", timeout=10).text
    assert "flowport_v1_SessionService" in metrics or "SessionService" in metrics, "per-method gRPC stats"


def _logged(edge: Stack, agents: set[str]) -> dict[str, dict[str, Any]]:
    """The access log entry of each request whose user agent starts with one of `agents`."""
    log = edge.settings.data_dir / "access.log"
    deadline = time.monotonic() + 10
    found: dict[str, dict[str, Any]] = {}
    while set(found) != agents and time.monotonic() < deadline:
        time.sleep(0.2)  # Envoy flushes its access log on a timer
        lines = log.read_text().splitlines() if log.exists() else []
        for entry in (json.loads(line) for line in lines if line.strip()):
            found.update({a: entry for a in agents if str(entry.get("user_agent") or "").startswith(a)})
    assert set(found) == agents, f"not in the access log: {agents - set(found)}"
    return found


def test_the_access_log_shows_the_method_and_path_the_client_sent(edge: Stack, http: httpx.Client) -> None:
    created = http.post("/api/sessions", json={"user_id": "log"}, headers={"user-agent": "log-post"})
    sid = created.json()["session_id"]
    assert http.get(f"/api/sessions/{sid}", headers={"user-agent": "log-get"}).status_code == 200
    assert http.delete(f"/api/sessions/{sid}", headers={"user-agent": "log-delete"}).status_code == 200
    # A gRPC client cannot put another method or path in the log with the transcoder's headers.
    spoofed = [("x-api-key", ADMIN_KEY), ("x-envoy-original-method", "DELETE"), ("x-envoy-original-path", "/spoofed")]
    with grpc.insecure_channel(edge.envoy_target, options=[("grpc.primary_user_agent", "log-grpc")]) as channel:
        session_pb2_grpc.SessionServiceStub(channel).ListSessions(
            session_pb2.ListSessionsRequest(), metadata=spoofed, timeout=10
        )
    entries = _logged(edge, {"log-post", "log-get", "log-delete", "log-grpc"})
    seen = {agent: (e["method"], e["path"], e["status"]) for agent, e in entries.items()}
    assert seen == {
        "log-post": ("POST", "/api/sessions", 200),
        "log-get": ("GET", f"/api/sessions/{sid}", 200),
        "log-delete": ("DELETE", f"/api/sessions/{sid}", 200),
        "log-grpc": ("POST", "/flowport.v1.SessionService/ListSessions", 200),
    }


class _Page(BaseHTTPRequestHandler):
    """Serves the EventSource page and collects what it reports."""

    page = ""
    reports: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        body = self.page.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        self.reports.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (see the README's test command)")
@pytest.mark.parametrize("stream", ["watch", "events"])
def test_a_browser_eventsource_receives_the_stream(
    edge: Stack, http: httpx.Client, tmp_path: Path, stream: str
) -> None:
    _slow_workflow(http, f"browser_{stream}", 1.0)
    started = http.post("/api/executions", json={"workflow_id": f"browser_{stream}"}).json()
    execution_id = started["execution_id"]
    # EventSource sends no headers: the key rides in ?access_token=, which Envoy moves into x-api-key.
    if stream == "watch":
        url = f"{edge.http}/api/executions/{execution_id}:watch?access_token={ADMIN_KEY}"
    else:  # the execution's events from the log, then live: nothing missed however late the page connects
        url = f"{edge.http}/events?execution_id={execution_id}&after_id=0&access_token={ADMIN_KEY}"
    _Page.reports = []
    _Page.page = f"""<!doctype html><html><body><script>
      const seen = [];
      const source = new EventSource({json.dumps(url)});
      source.onmessage = (message) => {{
        const data = JSON.parse(message.data);
        const event = data.event || (data.type ? data : null);
        // A watch starts with the execution's state; one that began after the
        // execution ended (a slow browser start) gets only that, and ends.
        const state = data.execution ? data.execution.state : null;
        seen.push(event ? event.type : "state:" + state);
        if ((event && event.type === "execution.completed") || state === "STATE_SUCCEEDED") {{
          source.close();
          fetch("/report", {{method: "POST", body: JSON.stringify({{seen}})}});
          document.title = "done";
        }}
      }};
    </script></body></html>"""
    server = ThreadingHTTPServer(("127.0.0.1", PAGE_PORT), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"{PAGE_ORIGIN}/",
            ],
            capture_output=True,
            timeout=90,
            check=False,
        )
        deadline = time.monotonic() + 10
        while not _Page.reports and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
        server.server_close()
    assert _Page.reports, "the page never reported: EventSource received no completion"
    seen = _Page.reports[0]["seen"]
    if stream == "watch":
        assert seen[0].startswith("state:") and seen[-1] in ("execution.completed", "state:STATE_SUCCEEDED"), seen
    else:
        assert seen[0] == "execution.started" and seen[-1] == "execution.completed", seen


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (see the README's test command)")
def test_the_eventsource_example_served_from_another_origin_names_the_gateway(edge: Stack, http: httpx.Client) -> None:
    """clients/examples/eventsource.html as its comment says to serve it: from an origin in
    --cors-origins, with ?gateway= naming the gateway."""
    from playwright.sync_api import sync_playwright

    _slow_workflow(http, "example_page", 0.0)
    # The folder served as the comment says (`python -m http.server`), on the page origin's port.
    examples = Path(__file__).parents[2] / "clients" / "examples"
    handler = functools.partial(_QuietFiles, directory=str(examples))
    server = ThreadingHTTPServer(("127.0.0.1", PAGE_PORT), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context()
            context.add_init_script(f"sessionStorage.setItem('flowport.apiKey', '{ADMIN_KEY}')")
            page = context.new_page()
            page.goto(f"{PAGE_ORIGIN}/eventsource.html?gateway={edge.http}")
            shown: list[str] = []
            for _ in range(20):  # the first run may start before the page's stream has opened
                run = http.post("/api/executions", json={"workflow_id": "example_page", "wait": True}).json()
                shown = page.locator("#events li").all_text_contents()
                if any(run["execution_id"] in item and "execution.completed" in item for item in shown):
                    break
                page.wait_for_timeout(250)
            else:
                raise AssertionError(f"no execution showed in the example's list: {shown}")
        finally:
            browser.close()
            server.shutdown()
            server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def test_a_failed_stream_is_a_json_error_before_the_first_event(http: httpx.Client) -> None:
    response = http.get("/api/executions/exe_missing:watch", headers={"Accept": "text/event-stream"})
    assert response.status_code == 404
    assert _status(response)["code"] == 5


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # With authentication on, as users run it (the admin key, so that every
    # operation is reachable); schemathesis also sends requests without it,
    # which must be 401s as documented, so the slowdown for repeated failures
    # is raised out of the way.
    edge = start_up(make_settings(tmp_path_factory.mktemp("fuzz"), max_login_attempts=1000))
    st = shutil.which("st")
    assert st is not None, "schemathesis comes with the dev extra"
    excluded = [
        # Streams: a fuzzer cannot read an endless body as one JSON document.
        "ExecutionService_WatchExecution",
        "EventService_StreamEvents",
        # Side effects beyond this machine: user workflows' nodes and webhook
        # deliveries may reach out to arbitrary hosts. Covered by their own tests.
        "ExecutionService_CreateExecution",
        "ExecutionService_CreateExecution_2",
        "ExecutionService_CreateExecution_3",
        "WebhookService_CreateWebhook",
        # Could revoke the very key the run authenticates with.
        "ApiKeyService_RevokeApiKey",
    ]
    result = subprocess.run(
        [
            st,
            "run",
            f"{edge.http}/openapi.json",
            "--url",
            edge.http,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance",
            "--max-examples",
            "25",
            "--seed",
            "7",
            "--workers",
            "1",
            "--header",
            f"x-api-key: {ADMIN_KEY}",
            *(arg for op in excluded for arg in ("--exclude-operation-id", op)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    stop_up(edge)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "generated" in result.stdout
