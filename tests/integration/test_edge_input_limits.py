"""Bad or large input through a real Envoy: short, marked errors that never
eject the server, REST answers as large as gRPC's, unknown JSON fields
refused, oversized workflows and headers refused, long waits not cut."""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import hypothesis
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from flowport.clients import ApiError, Client
from flowport.server.limits import MAX_PAGE_BYTES
from flowport.v1 import execution_pb2, session_pb2, session_pb2_grpc

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, EnvoyProcess, ServeProcess, Stack, make_settings, start_up, stop_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LONG = "x" * 40_000
SLOW_SECONDS = 5.0


class _Slow(http.server.BaseHTTPRequestHandler):
    """Answers every GET after SLOW_SECONDS."""

    def do_GET(self) -> None:
        time.sleep(SLOW_SECONDS)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Unary calls and idle streams time out sooner than a waiting execution
    # here, so a wait of a few seconds shows whether the wait routes outlast both.
    settings = make_settings(
        tmp_path_factory.mktemp("edge_input"), unary_timeout=2.0, stream_idle_timeout=3.0, stream_heartbeat=1.0
    )
    stack = start_up(settings)
    yield stack
    stop_up(stack)


@pytest.fixture
def rest(edge: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.http, headers=ADMIN_HEADERS, timeout=60) as client:
        yield client


def _marked(message: str) -> None:
    assert "characters, cut)" in message, message
    assert len(message) < 1100, f"{len(message)} characters"


def _ejections(stack: Stack) -> int:
    stats = httpx.get(f"http://127.0.0.1:{stack.settings.admin_port}/stats", timeout=10).text
    lines = [line for line in stats.splitlines() if "outlier_detection.ejections_enforced_total" in line]
    return sum(int(line.rsplit(":", 1)[1]) for line in lines)


def _code_with_a_long_name() -> str:
    # A SyntaxError whose message quotes a 40,000-character name, in 100 KB of code.
    name = "n" * 40_000
    return f"def f({name}):\n    global {name}\n" + "#" * (100_000 - 2 * 40_000 - 40)


def test_oversized_values_get_short_marked_errors_and_never_eject_the_server(edge: Stack, rest: httpx.Client) -> None:
    before = _ejections(edge)
    oversized = [
        (
            "code",
            lambda: rest.post(
                "/api/workflows",
                json={
                    "name": "w",
                    "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": _code_with_a_long_name()}}],
                },
            ),
            400,
        ),
        (
            "node type",
            lambda: rest.post("/api/workflows", json={"name": "w", "nodes": [{"type": LONG, "name": "a"}]}),
            400,
        ),
        ("workflow id", lambda: rest.post("/api/executions", json={"workflow_id": LONG}), 404),
        ("execution id in the path", lambda: rest.get(f"/api/executions/{'e' * 5000}"), 404),
        ("node type in the path", lambda: rest.get(f"/api/schemas/nodes/{'t' * 5000}"), 404),
    ]
    other = httpx.Client(base_url=edge.http, timeout=30)
    with Client(edge.envoy_target, api_key=ADMIN_KEY) as grpc_client:
        for _ in range(8):  # past every outlier threshold Envoy has
            for what, call, status in oversized:
                response = call()
                assert response.status_code == status, (what, response.text[:300])
                _marked(response.json()["message"])
                assert other.get("/health").status_code == 200, f"another caller failed after the {what} request"
            with pytest.raises(ApiError) as caught:
                grpc_client.sessions.GetSession(session_pb2.GetSessionRequest(session_id=LONG))
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND, caught.value
            # The same words for every missing session: nothing of the id is echoed.
            assert LONG[:20] not in caught.value.message and len(caught.value.message) < 100, caught.value.message
            assert other.get("/health").status_code == 200
    other.close()
    assert _ejections(edge) == before


def _python_workflow(rest: httpx.Client, name: str, code: str) -> str:
    created = rest.post(
        "/api/workflows",
        json={"name": name, "nodes": [{"type": "PythonCodeNode", "name": "py", "config": {"code": code}}]},
    )
    assert created.status_code == 200, created.text
    return str(created.json()["workflow_id"])


def test_rest_lists_executions_with_megabyte_outputs(rest: httpx.Client) -> None:
    workflow_id = _python_workflow(rest, "one_mb", f"result = 'x' * {2**20}")
    for _ in range(2):
        ran = rest.post("/api/executions", json={"workflow_id": workflow_id, "wait": True})
        assert ran.status_code == 200 and ran.json()["state"] == "STATE_SUCCEEDED", ran.text[:300]
    listed = rest.get("/api/executions", params={"page_size": 2, "workflow_id": workflow_id})
    assert listed.status_code == 200, listed.text[:300]
    assert [len(e["outputs"]["py"]["result"]) for e in listed.json()["executions"]] == [2**20, 2**20]


def test_an_output_at_the_sandbox_cap_comes_back_over_rest_as_over_grpc(edge: Stack, rest: httpx.Client) -> None:
    size = 4 * 2**20 - 16  # the sandbox's largest result, as JSON
    workflow_id = _python_workflow(rest, "four_mb", f"result = 'y' * {size}")
    waited = rest.post("/api/executions", json={"workflow_id": workflow_id, "wait": True})
    assert waited.status_code == 200, waited.text[:300]
    assert waited.json()["state"] == "STATE_SUCCEEDED" and len(waited.json()["outputs"]["py"]["result"]) == size
    execution_id = waited.json()["execution_id"]
    fetched = rest.get(f"/api/executions/{execution_id}")
    assert fetched.status_code == 200 and len(fetched.json()["outputs"]["py"]["result"]) == size
    with Client(edge.envoy_target, api_key=ADMIN_KEY) as client:
        over_grpc = client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=execution_id))
    assert len(over_grpc.outputs["py"]["result"]) == size


def test_a_page_ends_before_it_outgrows_what_rest_carries(rest: httpx.Client) -> None:
    item = MAX_PAGE_BYTES // 3 + 2**16  # three of these do not fit in one page
    workflow_id = _python_workflow(rest, "third_of_a_page", f"result = 'z' * {item}")
    for _ in range(3):
        ran = rest.post("/api/executions", json={"workflow_id": workflow_id, "wait": True})
        assert ran.status_code == 200, ran.text[:300]
    first = rest.get("/api/executions", params={"page_size": 3, "workflow_id": workflow_id})
    assert first.status_code == 200, first.text[:300]
    assert len(first.json()["executions"]) == 2 and first.json()["next_page_token"]
    second = rest.get(
        "/api/executions",
        params={"page_size": 3, "workflow_id": workflow_id, "page_token": first.json()["next_page_token"]},
    )
    assert second.status_code == 200 and len(second.json()["executions"]) == 1
    assert not second.json()["next_page_token"]
    ids = {e["execution_id"] for e in first.json()["executions"] + second.json()["executions"]}
    assert len(ids) == 3


def _sessions(rest: httpx.Client) -> int:
    return len(rest.get("/api/sessions", params={"page_size": 1000}).json()["sessions"])


def test_an_unknown_top_level_field_is_refused_by_name_and_does_nothing(rest: httpx.Client) -> None:
    before = _sessions(rest)
    response = rest.post("/api/sessions", json={"userid": "ada"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 3 and "'userid'" in body["message"]
    assert body["details"][0]["reason"] == "UNKNOWN_FIELD"
    assert body["details"][1]["field_violations"][0]["field"] == "userid"
    assert _sessions(rest) == before
    # Known fields, by proto or JSON name, still work; free-form values take any key.
    for given in ({"user_id": "ada"}, {"userId": "ada", "metadata": {"any": {"thing": 1}}}):
        created = rest.post("/api/sessions", json=given)
        assert created.status_code == 200 and created.json()["user_id"] == "ada", created.text


def test_an_unknown_nested_field_is_refused_by_its_path(rest: httpx.Client) -> None:
    workflow = {
        "name": "nested_typo",
        "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}, "timeot": "5s"}],
    }
    response = rest.post("/api/workflows", json=workflow)
    assert response.status_code == 400, response.text
    assert response.json()["details"][1]["field_violations"][0]["field"] == "nodes[0].timeot"
    assert rest.get("/api/workflows/nested_typo").status_code == 404


def test_a_wrongly_wrapped_key_request_makes_no_key(rest: httpx.Client) -> None:
    before = len(rest.get("/api/keys", params={"page_size": 1000}).json()["api_keys"])
    response = rest.post("/api/keys", json={"api_key": {"tenant": "acme", "description": "wrapped"}})
    assert response.status_code == 400, response.text
    assert "'api_key'" in response.json()["message"]
    assert len(rest.get("/api/keys", params={"page_size": 1000}).json()["api_keys"]) == before


def test_an_unknown_field_of_any_length_is_quoted_cut(rest: httpx.Client) -> None:
    response = rest.post("/api/sessions", json={LONG: 1})
    assert response.status_code == 400
    _marked(response.json()["message"])


def test_a_value_envoy_cannot_convert_is_named_not_quoted(rest: httpx.Client) -> None:
    response = rest.post("/api/executions", json={"workflow_id": "w", "wait": "y" * 3000})
    assert response.status_code == 400
    body = response.json()
    assert body["message"] == "'wait' is not a valid bool", body
    assert body["details"][1]["field_violations"][0]["field"] == "wait"
    assert "yyy" not in response.text and "x-flowport-local-reply" not in response.headers


def test_a_chain_of_a_thousand_nodes_is_a_400(rest: httpx.Client) -> None:
    nodes = [{"type": "PythonCodeNode", "name": f"n{i}", "config": {"code": "result = x"}} for i in range(1000)]
    connections = [
        {"from_node": f"n{i}", "from_output": "result", "to_node": f"n{i + 1}", "to_input": "x"} for i in range(999)
    ]
    response = rest.post("/api/workflows", json={"name": "chain", "nodes": nodes, "connections": connections})
    assert response.status_code == 400, response.text[:300]
    violations = response.json()["details"][1]["field_violations"]
    assert [(v["field"], v["description"]) for v in violations] == [("nodes", "at most 500 nodes, got 1000")]


def test_waiting_executions_outlast_the_unary_and_idle_timeouts(rest: httpx.Client, slow_url: str) -> None:
    workflow = {
        "name": "slow",
        "nodes": [
            {"type": "HTTPRequestNode", "name": "get", "config": {"url": slow_url, "method": "GET", "timeout": 30}}
        ],
    }
    created = rest.post("/api/workflows", json=workflow)
    assert created.status_code == 200, created.text
    for path, body in (
        ("/api/executions", {"workflow_id": "slow", "wait": True, "wait_timeout": "30s"}),
        ("/workflows/slow/execute", {"wait_timeout": "30s"}),
    ):
        response = rest.post(path, json=body)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        assert response.json()["state"] == "STATE_SUCCEEDED", (path, response.text[:300])


def test_headers_past_the_limit_are_always_431_json(edge: Stack) -> None:
    with httpx.Client(base_url=edge.http, timeout=30) as client:
        for size in (33_000, 40_000, 64_000, 100_000):
            for _ in range(5):
                response = client.get("/health", headers={"x-big": "v" * size})
                assert response.status_code == 431, (size, response.status_code, response.text[:200])
                assert response.headers["content-type"] == "application/json"
                body = response.json()
                assert body["code"] == 3 and body["details"][0]["reason"] == "REQUEST_HEADERS_TOO_LARGE"


def test_headers_within_the_limit_are_never_refused(edge: Stack) -> None:
    # The most Envoy lets through, in one header or in as many as it allows:
    # the server must take all of it, every time (with gRPC's default limits it
    # refused calls at random between 8 and 16 KiB).
    one = {"x-big": "v" * 31_000}
    many = {f"x-h{i:02d}": "v" * 300 for i in range(90)}
    with httpx.Client(base_url=edge.http, timeout=30, headers=ADMIN_HEADERS) as client:
        for headers in (one, many):
            statuses = {client.get("/api/sessions", headers=headers).status_code for _ in range(60)}
            assert statuses == {200}
    # Called directly, the server takes metadata past gRPC's default 8 KiB every time too.
    with grpc.insecure_channel(edge.grpc_target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        metadata = (("x-api-key", ADMIN_KEY), ("x-big", "v" * 20_000))
        for _ in range(30):
            stub.ListSessions(session_pb2.ListSessionsRequest(), metadata=metadata, timeout=30)


def test_answers_that_map_to_5xx_never_eject_the_server(tmp_path: Path) -> None:
    # A stand-in upstream, healthy to Envoy's checks, answering GetSession with
    # UNAVAILABLE (HTTP 503, which Envoy also retries) and ListSessions with
    # INTERNAL (500): answers, so the server is up.
    settings = make_settings(tmp_path / "data")
    calls = {"n": 0}

    def answer_with(code: grpc.StatusCode) -> Any:
        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            calls["n"] += 1
            context.abort(code, "not now")
            return b""

        return grpc.unary_unary_rpc_method_handler(fail)

    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, upstream)
    upstream.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "flowport.v1.SessionService",
                {
                    "GetSession": answer_with(grpc.StatusCode.UNAVAILABLE),
                    "ListSessions": answer_with(grpc.StatusCode.INTERNAL),
                },
            )
        ]
    )
    upstream.add_insecure_port(settings.grpc_target)
    upstream.start()
    envoy = EnvoyProcess(settings)
    envoy.start()
    try:
        base = settings.http_url
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the stand-in never turned healthy"
            time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=10, headers=ADMIN_HEADERS) as client:
            statuses = [client.get(path).status_code for _ in range(6) for path in ("/api/sessions/s", "/api/sessions")]
        assert statuses == [503, 500] * 6 and calls["n"] >= 12, "every call reached the server"
        stats = httpx.get(f"http://127.0.0.1:{settings.admin_port}/stats", timeout=10).text
        ejected = [line for line in stats.splitlines() if "outlier_detection.ejections_enforced_total" in line]
        assert ejected and all(line.endswith(": 0") for line in ejected), ejected
    finally:
        envoy.stop()
        upstream.stop(0)


def test_a_cursor_that_is_not_an_event_id_is_a_400(rest: httpx.Client) -> None:
    # "²".isdigit() is true and int() refuses it; 5,000 digits are past int()'s limit: both were a 500.
    for headers, params, field in (
        ({"last-event-id": "²".encode()}, {}, "last-event-id"),
        ({}, {"after_id": "²"}, "after_id"),
        ({}, {"after_id": "7" * 5000}, "after_id"),
        ({}, {"after_id": str(2**64)}, "after_id"),
    ):
        response = rest.get("/events", headers=headers, params=params)
        assert response.status_code == 400, (field, response.status_code, response.text[:300])
        body = response.json()
        assert body["details"][1]["field_violations"][0]["field"] == field
        if len(params.get("after_id", "")) > 200:
            _marked(body["message"])


# -- The body check fails closed: it reads what the transcoder reads, finds the route the
# transcoder finds, and treats as REST whatever Envoy does not serve as gRPC.

_SPACE = " \t\n\r\x0b\x0c"  # the transcoder's parser skips C's isspace(), \v and \f included
_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@st.composite
def _space(draw: st.DrawFn) -> str:
    return draw(st.text(alphabet=_SPACE, max_size=3))


@st.composite
def _string(draw: st.DrawFn, value: str) -> str:
    """`value` as a JSON string the transcoder reads back as `value`: either quote, any escapes."""
    quote = draw(st.sampled_from(['"', "'"]))
    out = []
    for ch in value:
        form = draw(st.sampled_from(["raw", "unicode", "short"]))
        if ch in (quote, "\\") or ord(ch) < 0x20 or form == "unicode":
            if form == "short" and ch in _ESCAPES:
                out.append(_ESCAPES[ch])
            elif ord(ch) > 0xFFFF:  # a surrogate pair
                code = ord(ch) - 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return quote + "".join(out) + quote


@st.composite
def _key(draw: st.DrawFn, name: str) -> str:
    bare = re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", name) and name not in ("true", "false", "null")
    return name if bare and draw(st.booleans()) else draw(_string(name))


@st.composite
def _number(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        n = draw(st.integers(-(10**18), 10**18))
        return draw(st.sampled_from([str(n), f"{n}.0", f"{n}e0", f"{n}E+00", f"{n}.5e-1"]))
    x = draw(st.floats(allow_nan=False, allow_infinity=False, width=64))
    return draw(st.sampled_from([repr(x), f"{x:e}", f"{x:E}", f"{x:.17g}"]))


@st.composite
def _object(draw: st.DrawFn, members: list[tuple[str, str]]) -> str:
    """An object of (key text, value text) members, spaced at random, maybe with a trailing comma."""
    if not members:
        return "{" + draw(_space()) + "}"
    parts = [
        draw(_space()) + key + draw(_space()) + ":" + draw(_space()) + value + draw(_space()) for key, value in members
    ]
    trailing = "," + draw(_space()) if draw(st.booleans()) else ""
    return "{" + ",".join(parts) + trailing + "}"


@st.composite
def _array(draw: st.DrawFn, items: list[str]) -> str:
    if not items:
        return "[" + draw(_space()) + "]"
    trailing = "," + draw(_space()) if draw(st.booleans()) else ""
    return "[" + ",".join(draw(_space()) + item + draw(_space()) for item in items) + trailing + "]"


@st.composite
def _free(draw: st.DrawFn, depth: int = 0) -> str:
    """Any JSON value, as free-form fields (Struct) take it."""
    kinds = ["null", "true", "false", "number", "string"] + (["array", "object"] if depth < 4 else [])
    kind = draw(st.sampled_from(kinds))
    if kind in ("null", "true", "false"):
        return kind
    if kind == "number":
        return draw(_number())
    if kind == "string":
        return draw(_string(draw(st.text(max_size=8))))
    if kind == "array":
        return draw(_array([draw(_free(depth + 1)) for _ in range(draw(st.integers(0, 3)))]))
    names = draw(st.lists(st.text(max_size=6), max_size=3, unique=True))
    return draw(_object([(draw(_string(n)), draw(_free(depth + 1))) for n in names]))


@st.composite
def _workflow_body(draw: st.DrawFn) -> tuple[str, str | None]:
    """A POST /api/workflows:validate body in any form the transcoder reads, and the path of an
    unknown key put in it (None: every key is a field)."""
    unknown = draw(st.sampled_from([None, None, "", "nodes[0]", "connections[0]"]))
    nodes = []
    for i in range(draw(st.integers(1, 2))):
        members = [
            (draw(_key("type")), draw(_string("PythonCodeNode"))),
            (draw(_key("name")), draw(_string(f"n{i}"))),
            (
                draw(_key("config")),
                draw(
                    _object(
                        [
                            (draw(_string("code")), draw(_string("result = 1"))),
                            *[
                                (draw(_string(k)), draw(_free()))
                                for k in draw(st.lists(st.text(max_size=5), max_size=2, unique=True))
                                if k != "code"
                            ],
                        ]
                    )
                ),
            ),
        ]
        if unknown == f"nodes[{i}]":
            members.insert(draw(st.integers(0, len(members))), (draw(_key("bogus_key")), draw(_free())))
        nodes.append(draw(_object(draw(st.permutations(members)))))
    connection = [
        (draw(_key(draw(st.sampled_from(["from_node", "fromNode"])))), draw(_string("n0"))),
        (draw(_key(draw(st.sampled_from(["from_output", "fromOutput"])))), draw(_string("result"))),
        (draw(_key("to_node")), draw(_string("n1"))),
        (draw(_key("toInput")), draw(_string("x"))),
    ]
    if unknown == "connections[0]":
        connection.append((draw(_key("bogus_key")), "1"))
    labels = [
        (draw(_string(k)), draw(_string(v)))
        for k, v in draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)).items()
    ]
    members = [
        (draw(_key("name")), draw(_string("fuzzed"))),
        (draw(_key("description")), draw(_string(draw(st.text(max_size=10))))),
        (draw(_key("nodes")), draw(_array(nodes))),
        (draw(_key("connections")), draw(_array([draw(_object(connection))]))),
        (draw(_key("labels")), draw(_object(labels))),
    ]
    if unknown == "":
        members.append((draw(_key("bogus_key")), draw(_free())))
    where = None if unknown is None else ("bogus_key" if unknown == "" else f"{unknown}.bogus_key")
    return draw(_space()) + draw(_object(draw(st.permutations(members)))) + draw(_space()), where


@hypothesis.given(_workflow_body())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_every_body_the_transcoder_reads_is_checked_and_none_is_refused_wrongly(
    edge: Stack, example: tuple[str, str | None]
) -> None:
    text, unknown = example
    response = httpx.post(
        f"{edge.http}/api/workflows:validate",
        content=text.encode(),
        headers={**ADMIN_HEADERS, "content-type": "application/json"},
        timeout=30,
    )
    if unknown is None:
        assert response.status_code == 200, (text, response.text[:300])
        assert response.json()["valid"] in (True, False)
    else:
        assert response.status_code == 400, (text, response.text[:300])
        body = response.json()
        assert body["details"][0]["reason"] == "UNKNOWN_FIELD", (text, body)
        assert [v["field"] for v in body["details"][1]["field_violations"]] == [unknown]


def test_path_variants_the_transcoder_routes_are_checked(rest: httpx.Client) -> None:
    # The transcoder drops trailing empty segments, splits a known verb off after a "/", and
    # binds a variable to an empty segment: each of these reaches the RPC, so each is checked.
    for path in (
        "/api/sessions/",
        "/api/sessions//?request_id=",
        "/api/workflows/:validate",
        "/workflows//execute",
        "/api/executions/exe_x/:cancel",
    ):
        response = rest.post(path, json={"bogus_key": 1})
        assert response.status_code == 400, (path, response.status_code, response.text[:300])
        assert response.json()["details"][0]["reason"] == "UNKNOWN_FIELD", path


def test_content_types_envoy_does_not_serve_as_grpc_are_checked(rest: httpx.Client) -> None:
    # Envoy's gRPC test is exactly application/grpc or application/grpc+…; the rest is transcoded.
    for content_type in ("application/grpc;charset=utf-8", "application/grpcx", "application/grpc-web+json"):
        response = rest.post("/api/sessions", content=b'{"userid":"ada"}', headers={"content-type": content_type})
        assert response.status_code == 400, (content_type, response.status_code, response.text[:300])
        assert response.json()["details"][0]["reason"] == "UNKNOWN_FIELD", content_type


def test_json_the_transcoder_reads_beyond_the_standard_is_checked(rest: httpx.Client) -> None:
    for body in (b'{\x0b"userid":"ada"}', b'{"user_id":"ada",\x0c"userid":1}', b'{"user_id":"w","userid":1,}'):
        response = rest.post("/api/sessions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (body, response.text[:300])
        assert response.json()["details"][0]["reason"] == "UNKNOWN_FIELD", body
    # Unreadable to the check: refused, never passed on unchecked.
    for body in (b'{"user_id": ', b'{"user_id" "ada"}', b'{"user_id":"ada"'):
        response = rest.post("/api/sessions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (body, response.text[:300])
        assert response.json()["code"] == 3 and "x-flowport-local-reply" not in response.headers


def test_no_reply_carries_the_local_reply_mark(edge: Stack, rest: httpx.Client) -> None:
    # The mark is for body_fields.lua, which removes it. Envoy runs every local reply through
    # the whole encoder chain, so it reaches body_fields too when a filter before it (the
    # buffer filter's 413) or the codec (431) made it.
    json_type = {"content-type": "application/json"}
    replies = {
        413: rest.post("/api/sessions", content=b"{" + b" " * (4 * 2**20), headers=json_type),
        431: rest.get("/health", headers={"x-big": "v" * 40_000}),
        404: rest.get("/api/no-such-thing"),
        400: rest.post("/api/executions", json={"workflow_id": "w", "wait": "y" * 3000}),
    }
    for status, response in replies.items():
        assert response.status_code == status, (status, response.text[:200])
        assert response.headers["content-type"] == "application/json", status
        assert response.json()["code"] in (3, 5), status
        assert "x-flowport-local-reply" not in response.headers, status


CREATE_EXECUTION = "/flowport.v1.ExecutionService/CreateExecution"


def test_a_call_outlasting_its_route_timeout_is_answered_and_never_ejects_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real slow unary call: CreateExecution waiting for a workflow that sleeps. Its route
    # normally outlasts the longest wait; here (test-side only) it gets a 4 s timeout, so the
    # wait outlasts the route, as any unary call outlasting --unary-timeout would. The server
    # answers a second before the route's end: a slow machine has that second to pass it on.
    from flowport.transcoder import envoy_config

    rendered = envoy_config.render

    def short_wait_route(settings: Any, descriptor: Any = None) -> dict[str, Any]:
        config = rendered(settings, descriptor)
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            # The route and its twin for calls carrying a request_id (the SDK sets one on every create).
            if route["name"] in (CREATE_EXECUTION, CREATE_EXECUTION + "+request_id"):
                route["route"]["timeout"] = route["route"]["idle_timeout"] = "4s"
        return config

    monkeypatch.setattr(envoy_config, "render", short_wait_route)
    settings = make_settings(tmp_path / "data")
    server = ServeProcess(settings)
    server.start()
    envoy = EnvoyProcess(settings)
    try:
        envoy.start()
        with httpx.Client(base_url=settings.http_url, headers=ADMIN_HEADERS, timeout=30) as client:
            code = "import time\ntime.sleep(10)\nresult = 1"
            created = client.post(
                "/api/workflows",
                json={"name": "sleeps", "nodes": [{"type": "PythonCodeNode", "name": "a", "config": {"code": code}}]},
            )
            assert created.status_code == 200, created.text
            # Past Envoy's three consecutive failures that eject, at once (each waits out the route).
            with ThreadPoolExecutor(5) as calls:
                responses = list(
                    calls.map(
                        lambda _: client.post("/api/executions", json={"workflow_id": "sleeps", "wait": True}),
                        range(5),
                    )
                )
            for response in responses:
                assert response.status_code == 504, (response.status_code, response.text[:300])
                # The server's answer (DEADLINE_EXCEEDED, its own domain), not Envoy's at the route's end.
                info = response.json()["details"][0]
                assert (info["domain"], info["reason"]) == ("flowport.dev", "DEADLINE_EXCEEDED"), info
            with (
                Client(f"127.0.0.1:{settings.http_port}", api_key=ADMIN_KEY) as over_grpc,
                pytest.raises(ApiError) as caught,
            ):
                over_grpc.executions.CreateExecution(
                    execution_pb2.CreateExecutionRequest(workflow_id="sleeps", wait=True), timeout=30
                )
            assert (caught.value.code(), caught.value.reason) == (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "DEADLINE_EXCEEDED",
            )
            stats = httpx.get(f"http://127.0.0.1:{settings.admin_port}/stats", timeout=10).text
            ejected = [line for line in stats.splitlines() if "outlier_detection.ejections_enforced_total" in line]
            assert ejected and all(line.endswith(": 0") for line in ejected), ejected
            assert client.get("/api/sessions").status_code == 200
    finally:
        envoy.stop()
        server.stop()
