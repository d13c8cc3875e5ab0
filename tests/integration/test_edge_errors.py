"""Envoy's own errors about a request, through a real Envoy and server: they
name what is wrong and where without quoting the body (a secret's value),
in the JSON google.rpc.Status shape of every other REST error; cutting a long
one leaves no Lua error in Envoy's log; and the access log records the gRPC
status the client was answered with, REST or gRPC."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from flowport.v1 import session_pb2, session_pb2_grpc

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, Stack, make_settings, start_up, stop_up

pytestmark = pytest.mark.integration

SECRET = "sk_live_0123456789abcdefghijKLMNOP"
# Pieces of SECRET a message quoting the body would carry: the transcoder quoted 20 bytes
# either side of where its parser stopped.
PIECES = ("0123456789", "abcdefghij", "KLMNOP", "sk_live")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_up(make_settings(tmp_path_factory.mktemp("edge_errors"), max_login_attempts=1000))
    yield stack
    stop_up(stack)


@pytest.fixture
def rest(edge: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.http, headers=ADMIN_HEADERS, timeout=30) as client:
        yield client


def _status(response: httpx.Response, reason: str) -> dict[str, Any]:
    """The response's google.rpc.Status, checked to be a 400 with `reason` in its ErrorInfo."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == 3, body
    info = body["details"][0]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo", body
    assert info["reason"] == reason, body
    return body


def _quotes_nothing_of_the_secret(response: httpx.Response) -> None:
    for piece in PIECES:
        assert piece not in response.text, response.text


def test_a_body_that_is_not_json_is_refused_without_quoting_it(rest: httpx.Client) -> None:
    value = json.dumps(SECRET)
    bodies = {
        # Something after the value (the reviewer's case): the transcoder quoted `9abcdefghijKLMNOP"} x`.
        f'{{"value":{value}}} x': 47,
        f'{{"value":{value} x}}': 46,
        f'{{"value":{SECRET}}}': 9,  # no quotes: not a JSON value
        f'{{"value":"{SECRET}\\u00"}}': 44,  # an escape cut short
        f'{{"value":"{SECRET}\\ud800"}}': 44,  # half a surrogate pair
        f'{{"value":{value},"description":01}}': 60,  # octal, to the transcoder's parser
        f'{{"value":{value},"description":}}': 60,
    }
    for body, offset in bodies.items():
        response = rest.put("/api/secrets/ASEC", content=body.encode(), headers={"content-type": "application/json"})
        status = _status(response, "INVALID_JSON")
        _quotes_nothing_of_the_secret(response)
        assert status["message"].startswith("the body of PUT /api/secrets/ASEC is not valid JSON: "), status
        assert status["message"].endswith(f" at byte {offset}"), (body, status)
        assert status["details"][0]["metadata"] == {"offset": str(offset)}, status
    # What only the transcoder's parser finds (bytes that are not UTF-8, NaN in a free-form
    # value) is rewritten on the way out: what is wrong, none of the bytes around it.
    for path, body in (
        ("/api/secrets/ASEC", f'{{"value":"{SECRET}\xff"}}'.encode("latin-1")),
        ("/api/sessions", f'{{"metadata":{{"token":{value},"n":NaN}}}}'.encode()),
    ):
        response = rest.request("POST" if path == "/api/sessions" else "PUT", path, content=body)
        status = _status(response, "INVALID_JSON")
        _quotes_nothing_of_the_secret(response)
        assert status["message"].startswith("the request body is not valid JSON: "), status


def test_webhook_secrets_and_resource_headers_are_not_quoted_either(rest: httpx.Client) -> None:
    webhook = json.dumps({"url": "http://127.0.0.1:9/hook", "secret": SECRET})
    resource = json.dumps({"name": "partner", "http": {"base_url": "http://x", "headers": {"Authorization": SECRET}}})
    for path, body in (("/api/webhooks", webhook), ("/api/resources", resource)):
        for broken in (body + " x", body[:-1] + " x}", body.replace(f'"{SECRET}"', SECRET)):
            response = rest.post(path, content=broken.encode(), headers={"content-type": "application/json"})
            _status(response, "INVALID_JSON")
            _quotes_nothing_of_the_secret(response)


def test_a_value_the_transcoder_cannot_convert_is_named_by_its_field_not_quoted(rest: httpx.Client) -> None:
    for body, field, words in (
        ({"ttl": 5}, "session.ttl", "not a valid google.protobuf.Duration: Invalid data type for duration"),
        ({"ttl": "abc"}, "session.ttl", "not a valid google.protobuf.Duration: Illegal duration format"),
        ({"user_id": 123456789}, "session.user_id", "not a valid string"),
    ):
        status = _status(rest.post("/api/sessions", json=body), "INVALID_ARGUMENT")
        violations = status["details"][1]["field_violations"]
        assert [v["field"] for v in violations] == [field], status
        assert violations[0]["description"].startswith(words), status
        assert "123456789" not in status["message"] and "value is" not in status["message"], status
        # A Duration says what one looks like.
        assert ('"3600s"' in status["message"]) == (field == "session.ttl"), status
    secret = _status(rest.put("/api/secrets/ASEC", json={"value": 12345678901234567890}), "INVALID_ARGUMENT")
    assert "1234567" not in json.dumps(secret) and secret["details"][1]["field_violations"][0]["field"] == "value"


def test_a_list_or_an_object_where_one_value_belongs_names_its_field(rest: httpx.Client) -> None:
    # The transcoder named the enclosing message ("session: Proto field is not repeating").
    for body, field, words in (
        ({"ttl": ["5s"]}, "ttl", "a list, where one value belongs"),
        ({"user_id": {"a": SECRET}}, "user_id", "an object, where one value"),
        ([{"user_id": "u"}], "", "a list, where an object belongs"),
    ):
        response = rest.post("/api/sessions", json=body)
        status = _status(response, "INVALID_ARGUMENT")
        _quotes_nothing_of_the_secret(response)
        violations = status["details"][1]["field_violations"]
        assert [v["field"] for v in violations] == [field], status
        assert violations[0]["description"].startswith(words), status
    # A map of strings given an object as a value: the transcoder passed on what the server could not decode.
    labels = rest.post("/api/workflows:validate", json={"name": "w", "labels": {"team": {"a": 1}}})
    assert _status(labels, "INVALID_ARGUMENT")["details"][1]["field_violations"][0]["field"] == "labels[team]"
    # A single object for a repeated field is its one element, as the transcoder reads it.
    one_node = rest.post(
        "/api/workflows:validate", json={"name": "w", "nodes": {"type": "PythonCodeNode", "name": "a"}}
    )
    assert one_node.status_code == 200, one_node.text


def test_envoys_other_400s_have_the_status_shape_and_a_long_one_is_cut_without_a_lua_error(
    edge: Stack, rest: httpx.Client
) -> None:
    edge.printed_since_read()
    name = "b" * 500
    response = rest.get(f"/api/sessions?{name}=1")
    # The transcoder's refusal of an unknown parameter, named as the server names a body's unknown field.
    status = _status(response, "UNKNOWN_FIELD")
    assert status["details"][0]["domain"] == "flowport.dev"
    assert "characters, cut)" in status["message"] and len(status["message"]) < 400, status
    assert len(status["details"][1]["field_violations"][0]["field"]) < 300, status
    assert "x-flowport-local-reply" not in response.headers
    time.sleep(1.0)  # Envoy's log is written as it happens; leave it a moment
    assert "object used outside of proper scope" not in edge.printed_since_read()


def _logged(edge: Stack, agents: set[str]) -> dict[str, dict[str, Any]]:
    """The access log entry of each request whose user agent is one of `agents`."""
    log = edge.settings.data_dir / "access.log"
    deadline = time.monotonic() + 10
    found: dict[str, dict[str, Any]] = {}
    while set(found) != agents and time.monotonic() < deadline:
        time.sleep(0.2)  # Envoy flushes its access log on a timer
        lines = log.read_text().splitlines() if log.exists() else []
        for entry in (json.loads(line) for line in lines if line.strip()):
            # gRPC clients add their own name to the user agent.
            agent = str(entry.get("user_agent") or "").split(" ")[0]
            if agent in agents:
                found[agent] = entry
    assert set(found) == agents, f"not in the access log: {agents - set(found)}"
    return found


def test_the_access_log_records_the_grpc_status_the_call_was_answered_with(edge: Stack, rest: httpx.Client) -> None:
    # Envoy's %GRPC_STATUS% maps a REST answer's HTTP status back to a code: 404 was logged
    # 12 (UNIMPLEMENTED), 409 2 (UNKNOWN), 400 13 (INTERNAL).
    request_id = {"request_id": f"log-{time.monotonic_ns()}"}
    assert rest.post("/api/sessions", json={"user_id": "a"}, params=request_id).status_code == 200
    calls = {
        "status-ok": (lambda ua: rest.get("/api/sessions", headers=ua), 200, 0),
        "status-not-found": (lambda ua: rest.get("/api/sessions/ses_missing", headers=ua), 404, 5),
        "status-exists": (
            lambda ua: rest.post("/api/sessions", json={"user_id": "b"}, params=request_id, headers=ua),
            409,
            6,
        ),
        "status-invalid": (lambda ua: rest.post("/api/sessions", json={"ttl": "0s"}, headers=ua), 400, 3),
        "status-unauthenticated": (
            lambda ua: httpx.get(f"{edge.http}/api/sessions", headers=ua, timeout=30),
            401,
            16,
        ),
        # Envoy's own answers: the code their JSON body carries.
        "status-no-route": (lambda ua: rest.get("/api/no-such-thing", headers=ua), 404, 5),
        "status-bad-json": (lambda ua: rest.post("/api/sessions", content=b"{", headers=ua), 400, 3),
    }
    for agent, (call, http_status, _) in calls.items():
        response = call({"user-agent": agent})
        assert response.status_code == http_status, (agent, response.text)
    options = [("grpc.primary_user_agent", "status-grpc")]
    with grpc.insecure_channel(edge.envoy_target, options=options) as channel, pytest.raises(grpc.RpcError) as caught:
        session_pb2_grpc.SessionServiceStub(channel).GetSession(
            session_pb2.GetSessionRequest(session_id="ses_missing"),
            metadata=(("x-api-key", ADMIN_KEY),),
            timeout=10,
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    logged = _logged(edge, {*calls, "status-grpc"})
    seen = {agent: (entry["status"], entry["grpc_status"]) for agent, entry in logged.items()}
    expected = {agent: (http_status, code) for agent, (_, http_status, code) in calls.items()}
    assert seen == {**expected, "status-grpc": (200, 5)}


def _violated(status: dict[str, Any]) -> list[str]:
    """The fields of a status's BadRequest field violations."""
    bad_request = next(d for d in status["details"] if d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
    return [violation["field"] for violation in bad_request["field_violations"]]


def test_a_query_parameter_given_twice_for_a_field_of_one_value_is_refused_naming_it_not_its_values(
    rest: httpx.Client,
) -> None:
    # The transcoder took the last value silently (grpc-gateway: "too many values for field").
    session = rest.post("/api/sessions", json={"user_id": "query-twice"}).json()["session_id"]
    other = rest.post("/api/sessions", json={"user_id": "query-twice-other"}).json()["session_id"]
    before = len(rest.get("/api/sessions", params={"user_id": "query-twice"}).json()["sessions"])
    cases = [
        ("GET", "/api/sessions?page_size=10&page_size=487", "page_size"),
        ("POST", f"/api/sessions?request_id={SECRET}&request_id=second-{SECRET}", "request_id"),
        ("GET", f"/api/executions?session_id={session}&session_id={other}", "session_id"),
        ("GET", "/api/events/recent?count=3&types=a&count=487&types=b", "count"),
        # A stream is refused before it opens.
        ("GET", f"/events?session_id={session}&session_id={other}", "session_id"),
        # Both names of one field (proto and JSON), or a name percent-encoded, are one field.
        ("GET", "/api/sessions?page_size=10&pageSize=487", "page_size"),
        ("GET", "/api/sessions?page%5Fsize=10&page_size=487", "page_size"),
        ("GET", "/api/sessions?page%5fsize=10&page%5Fsize=487&user%5Fid=a", "page_size"),
        ("GET", "/api/sessions?page_size=10&user_id=a&userId=b", "user_id"),
        # A field of the path given again in the query (the query's value was the one used).
        ("GET", f"/api/sessions/{session}?session_id={other}", "session_id"),
        ("GET", f"/api/sessions/{session}?sessionId={other}", "session_id"),
        ("DELETE", f"/api/sessions/{other}?session_id={session}", "session_id"),
    ]
    for method, url, field in cases:
        response = rest.request(method, url, json={"user_id": "query-twice"} if method == "POST" else None)
        status = _status(response, "INVALID_ARGUMENT")
        assert status["details"][0]["domain"] == "flowport.dev", status
        assert _violated(status) == [field], (url, status)
        assert f"'{field}'" in status["message"], status
        # The values are never quoted: not the numbers, not the ids, not a secret.
        _quotes_nothing_of_the_secret(response)
        for value in ("487", session, other):
            assert value not in response.text, (url, response.text)
    # Nothing was done: no session created by the refused POST, none deleted by the DELETE.
    assert len(rest.get("/api/sessions", params={"user_id": "query-twice"}).json()["sessions"]) == before
    assert rest.get(f"/api/sessions/{other}").status_code == 200
    # Two at once are both named.
    both = _status(rest.get("/api/sessions?page_size=1&page_token=&pageSize=2&page_token="), "INVALID_ARGUMENT")
    assert _violated(both) == ["page_size", "page_token"], both


def test_a_repeated_field_still_takes_several_query_values(rest: httpx.Client) -> None:
    for service_id, capabilities in (("dup-both", ["dup-x", "dup-y"]), ("dup-one", ["dup-x"])):
        registered = rest.post(
            "/api/services",
            json={"service_id": service_id, "endpoint": "http://127.0.0.1:9/", "capabilities": capabilities},
        )
        assert registered.status_code == 200, registered.text
    listed = rest.get("/api/services?capabilities=dup-x&capabilities=dup-y")
    assert listed.status_code == 200, listed.text
    assert [s["service_id"] for s in listed.json()["services"]] == ["dup-both"]
    # types and event_types are two repeated fields the server merges: each takes several values,
    # by either of its names; count and page_size are two fields too (the smaller applies).
    recent = rest.get("/api/events/recent?types=a&types=b&event_types=c&eventTypes=d&count=5&page_size=7")
    assert recent.status_code == 200, recent.text


def test_queries_that_set_each_field_once_are_unchanged(rest: httpx.Client) -> None:
    for user in ("once-a", "once-b", "once-a"):
        assert rest.post("/api/sessions", json={"user_id": user}).status_code == 200
    for query in ("page_size=1&user_id=once-a", "pageSize=1&userId=once-a", "page%5Fsize=1&user_id=once-a"):
        listed = rest.get(f"/api/sessions?{query}")
        assert listed.status_code == 200, (query, listed.text)
        assert len(listed.json()["sessions"]) == 1 and listed.json()["next_page_token"], (query, listed.text)
    # A name without "=" is no parameter to the transcoder, however often it comes.
    assert len(rest.get("/api/sessions?user_id=once-a&page_size&page_size").json()["sessions"]) == 2
    session = rest.get("/api/sessions?user_id=once-b").json()["sessions"][0]["session_id"]
    assert rest.get(f"/api/sessions/{session}?").json()["user_id"] == "once-b"
    # An unknown parameter, even twice, is still the transcoder's to refuse.
    unknown = _status(rest.get("/api/sessions?bogus=1&bogus=2"), "UNKNOWN_FIELD")
    assert unknown["message"].startswith("unknown query parameter 'bogus': not a parameter of this call"), unknown
    assert unknown["details"][1]["field_violations"][0]["field"] == "bogus", unknown
    not_a_number = _status(rest.get("/api/sessions?page_size=abc"), "INVALID_ARGUMENT")
    assert not_a_number["message"] == "'page_size' is not a valid int32", not_a_number


def _made_workflow(rest: httpx.Client, name: str) -> str:
    code = {"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 7"}}
    made = rest.post("/api/workflows", json={"name": name, "nodes": [code]})
    assert made.status_code == 200, made.text
    return str(made.json()["workflow_id"])


def _runs(rest: httpx.Client, workflow_id: str) -> int:
    listed = rest.get("/api/executions", params={"workflow_id": workflow_id, "page_size": 100})
    assert listed.status_code == 200, listed.text
    return len(listed.json()["executions"])


def _refused_naming(response: httpx.Response, field: str, *values: str) -> dict[str, Any]:
    """A 400 as the query check's (INVALID_ARGUMENT of flowport.dev, one violation: `field`), quoting no `values`."""
    status = _status(response, "INVALID_ARGUMENT")
    assert status["details"][0]["domain"] == "flowport.dev", status
    assert _violated(status) == [field], status
    assert f"'{field}'" in status["message"], status
    _quotes_nothing_of_the_secret(response)
    for value in values:
        assert value not in response.text, (value, response.text)
    return status


def test_a_body_key_for_the_workflow_the_path_names_is_refused_and_nothing_runs(rest: httpx.Client) -> None:
    # The body's key won over the path: POST /workflows/wfa/execute with {"workflow_id": "wfb"}
    # ran wfb while the path (and Envoy's access log) named wfa.
    wfa, wfb = _made_workflow(rest, "bound-wfa"), _made_workflow(rest, "bound-wfb")
    before = {w: _runs(rest, w) for w in (wfa, wfb)}
    for path in (f"/workflows/{wfa}/execute", f"/{wfa}/execute"):
        for key in ("workflow_id", "workflowId"):
            status = _refused_naming(rest.post(path, json={key: wfb, "inputs": {}}), "workflow_id", wfa, wfb)
            assert "set by the path and again by the body" in status["message"], status
    # Another value is refused however the body spells it: null, or one key right and one not.
    for body in (b'{"workflow_id":null}', f'{{"workflow_id":"{wfa}","workflowId":"{wfb}"}}'.encode()):
        _refused_naming(rest.post(f"/workflows/{wfa}/execute", content=body), "workflow_id", wfa, wfb)
    assert {w: _runs(rest, w) for w in (wfa, wfb)} == before, "no execution made"


def test_a_secret_named_otherwise_in_the_body_than_in_the_path_is_not_written(rest: httpx.Client) -> None:
    put = rest.put("/api/secrets/BOUND_PATH_NAME", json={"name": "BOUND_BODY_NAME", "value": SECRET})
    _refused_naming(put, "name", "BOUND_PATH_NAME", "BOUND_BODY_NAME")
    for name in ("BOUND_PATH_NAME", "BOUND_BODY_NAME"):
        assert rest.get(f"/api/secrets/{name}").status_code == 404, name


def test_revoking_a_key_with_another_named_in_the_body_revokes_neither(rest: httpx.Client) -> None:
    made = [rest.post("/api/keys", json={"tenant": "bound", "roles": ["user"]}).json() for _ in range(2)]
    (a, b), keys = [m["api_key"]["key_id"] for m in made], [m["key"] for m in made]
    _refused_naming(rest.post(f"/api/keys/{a}:revoke", json={"key_id": b}), "key_id", a, b)
    for key_id, key in zip((a, b), keys, strict=True):
        assert not rest.get(f"/api/keys/{key_id}").json().get("revoke_time"), key_id
        assert rest.get("/api/sessions", headers={"x-api-key": key}).status_code == 200, key_id


def test_a_body_that_repeats_the_paths_very_value_is_taken(rest: httpx.Client) -> None:
    # Clients that send the whole resource, its id too (grpc-gateway's, Kailash's).
    wfa = _made_workflow(rest, "bound-same")
    ran = rest.post(f"/workflows/{wfa}/execute", json={"workflow_id": wfa, "inputs": {}})
    assert ran.status_code == 200 and ran.json()["workflow_id"] == wfa, ran.text
    camel = rest.post(f"/{wfa}/execute", json={"workflowId": wfa})
    assert camel.status_code == 200 and camel.json()["workflow_id"] == wfa, camel.text
    # As the transcoder reads both: the path percent-decoded, the body's escapes.
    encoded = rest.post(
        f"/workflows/{wfa[:-1]}%{ord(wfa[-1]):02X}/execute",
        content=f'{{"workflow_id":"{wfa[:-1]}\\u{ord(wfa[-1]):04x}"}}',
    )
    assert encoded.status_code == 200 and encoded.json()["workflow_id"] == wfa, encoded.text
    put = rest.put("/api/secrets/BOUND_SAME", json={"name": "BOUND_SAME", "value": "v1"})
    assert put.status_code == 200, put.text
    assert rest.get("/api/secrets/BOUND_SAME").json()["name"] == "BOUND_SAME"
    made = [rest.post("/api/keys", json={"tenant": "bound", "roles": ["user"]}).json() for _ in range(2)]
    key_id = made[0]["api_key"]["key_id"]
    revoked = rest.post(f"/api/keys/{key_id}:revoke", json={"keyId": key_id})
    assert revoked.status_code == 200 and revoked.json()["revoke_time"], revoked.text
    assert rest.get("/api/sessions", headers={"x-api-key": made[1]["key"]}).status_code == 200, "the other still works"


def test_every_route_refuses_a_body_key_for_a_field_its_path_binds(rest: httpx.Client) -> None:
    # Every route of the descriptor set whose body is "*" and whose path binds a field (:revoke,
    # :cancel, :heartbeat, :redeliver, both execute routes, PUT /api/secrets/{name}): refused
    # before it reaches the server, by either name of the field.
    from flowport.transcoder.http_rules import methods

    routes = {
        (b.verb.upper(), b.template, tuple(b.path_params))
        for m in methods()
        for b in m.bindings
        if b.body == "*" and b.path_params
    }
    assert len(routes) >= 7, routes
    for verb, template, params in sorted(routes):
        url = template
        for n, param in enumerate(params):
            url = url.replace("{" + param + "}", f"bound-path-{n}")
        for param in params:
            camel = param.split("_")[0] + "".join(part.title() for part in param.split("_")[1:])
            for key in {param, camel}:
                response = rest.request(verb, url, json={key: "bound-body-value"})
                _refused_naming(response, param, "bound-path-", "bound-body-value")


def test_a_query_parameter_for_a_field_the_body_sets_too_is_refused(rest: httpx.Client) -> None:
    # body "*": the query's value was dropped for the body's, silently.
    wfa, wfb = _made_workflow(rest, "query-body-wfa"), _made_workflow(rest, "query-body-wfb")
    before = {w: _runs(rest, w) for w in (wfa, wfb)}
    for query in (f"workflow_id={wfb}", f"workflowId={wfb}"):
        for key in ("workflow_id", "workflowId"):
            response = rest.post(f"/api/executions?{query}", json={key: wfa})
            status = _refused_naming(response, "workflow_id", wfa, wfb)
            assert "set by the query and again by the body" in status["message"], status
    # A body field's fields too (the query won or lost by which names were used).
    response = rest.post("/api/sessions?session.userId=query-user", json={"userId": "body-user"})
    _refused_naming(response, "session.user_id", "query-user", "body-user")
    assert rest.get("/api/sessions", params={"user_id": "body-user"}).json()["sessions"] == []
    assert rest.get("/api/sessions", params={"user_id": "query-user"}).json()["sessions"] == []
    assert {w: _runs(rest, w) for w in (wfa, wfb)} == before, "no execution made"
    # Each set once, by the query or the body, is as before.
    ran = rest.post(f"/api/executions?workflow_id={wfb}", json={"inputs": {}})
    assert ran.status_code == 200 and ran.json()["workflow_id"] == wfb, ran.text
    session = rest.post("/api/sessions", json={"user_id": "query-body"}).json()["session_id"]
    ran = rest.post(f"/workflows/{wfa}/execute?session_id={session}", json={"inputs": {}})
    assert ran.status_code == 200 and ran.json()["session_id"] == session, ran.text


def _body(rest: httpx.Client, method: str, path: str, body: str) -> httpx.Response:
    """`body` sent as written: a JSON object with a key given twice, which json= cannot send."""
    return rest.request(method, path, content=body.encode(), headers={"content-type": "application/json"})


_NODE = '{"type":"PythonCodeNode","name":"a","config":{"code":"result = 7"}}'


def test_a_field_given_twice_in_the_body_is_refused_naming_it_and_nothing_is_made(rest: httpx.Client) -> None:
    # The transcoder kept one of the two values, silently: {"workflow_id":"wfa","workflowId":"wfb"} ran wfb.
    wfa, wfb = _made_workflow(rest, "twice-wfa"), _made_workflow(rest, "twice-wfb")
    before = {w: _runs(rest, w) for w in (wfa, wfb)}
    for body in (
        f'{{"workflow_id":"{wfa}","workflowId":"{wfb}"}}',  # both names, at the top of the body
        f'{{"workflowId":"{wfa}","workflow_id":"{wfb}","inputs":{{}}}}',
        f'{{"workflow_id":"{wfa}","inputs":{{}},"workflow_id":"{wfb}"}}',  # the same key twice
        f'{{"workflow_id":"{wfa}","\\u0077orkflow_id":"{wfb}"}}',  # the same key, as the transcoder reads it
    ):
        status = _refused_naming(_body(rest, "POST", "/api/executions", body), "workflow_id", wfa, wfb)
        assert "given 2 times in the body" in status["message"], status
        assert status["details"][0]["metadata"] == {"message_type": "flowport.v1.CreateExecutionRequest"}
    assert {w: _runs(rest, w) for w in (wfa, wfb)} == before, "no execution made"
    # Inside the message a body field holds (CreateSession's session): named as the query check names it.
    for body in (
        f'{{"user_id":"twice-a","userId":"twice-b","metadata":{{"token":"{SECRET}"}}}}',
        '{"user_id":"twice-a","user_id":"twice-b"}',
    ):
        _refused_naming(_body(rest, "POST", "/api/sessions", body), "session.user_id", "twice-a", "twice-b")
    for user in ("twice-a", "twice-b"):
        assert rest.get("/api/sessions", params={"user_id": user}).json()["sessions"] == [], user
    # Deeper: a nested message's field, and one in an element of a repeated field (each body valid but
    # for that: the transcoder kept one value and the server made it).
    http = f'{{"base_url":"http://127.0.0.1:9/a","baseUrl":"http://127.0.0.1:9/b","headers":{{"x":"{SECRET}"}}}}'
    resource = _body(rest, "POST", "/api/resources", f'{{"name":"twice-resource","http":{http}}}')
    status = _refused_naming(resource, "resource.http.base_url", "127.0.0.1:9/a", "127.0.0.1:9/b")
    assert "(as 'base_url' and 'baseUrl')" in status["message"], status
    assert rest.get("/api/resources/twice-resource").status_code == 404
    retry = (
        '{"type":"PythonCodeNode","name":"b","config":{"code":"result = 7"},"retry":{"maxAttempts":2,"max_attempts":5}}'
    )
    named_twice = _NODE.replace('"name":"a"', '"name":"a","name":"b"')
    for body, field in (
        (f'{{"name":"twice-node","nodes":[{_NODE},{retry}]}}', "workflow.nodes[1].retry.max_attempts"),
        (f'{{"name":"twice-node","nodes":[{named_twice}]}}', "workflow.nodes[0].name"),
        # A message, a map or a Struct given twice is one field given twice too: the transcoder merged them.
        (f'{{"name":"twice-node","nodes":[{_NODE}],"metadata":{{"a":1}},"metadata":{{"b":2}}}}', "workflow.metadata"),
        (f'{{"name":"twice-node","name":"twice-node","nodes":[{_NODE}]}}', "workflow.name"),
    ):
        _refused_naming(_body(rest, "POST", "/api/workflows", body), field, "result = 7")
    assert rest.get("/api/workflows/twice-node").status_code == 404
    # Several at once are each named once, whatever else is wrong with them.
    both = _status(
        _body(rest, "POST", "/api/sessions", '{"user_id":"a","ttl":"5s","userId":"b","ttl":"6s","user_id":"c"}'),
        "INVALID_ARGUMENT",
    )
    assert _violated(both) == ["session.user_id", "session.ttl"], both
    assert "'session.user_id' is given 3 times in the body (as 'user_id' and 'userId')" in both["message"], both


def test_a_key_given_twice_in_a_map_is_refused_naming_the_map_not_the_value(rest: httpx.Client) -> None:
    # In one object the transcoder refused it (quoting the key), in the map given twice it kept the last.
    for labels in ('"labels":{"team":"a","team":"b"}', '"labels":{"team":"a"},"labels":{"x":"y","team":"b"}'):
        body = f'{{"name":"twice-labels","nodes":[{_NODE}],{labels}}}'
        status = _refused_naming(_body(rest, "POST", "/api/workflows", body), "workflow.labels")
        assert "the key 'team' more than once" in status["message"], status
        assert '"a"' not in status["message"] and '"b"' not in status["message"], status
    assert rest.get("/api/workflows/twice-labels").status_code == 404
    # A header's value (a secret) is never quoted; nor is a long key, past the usual cut.
    long_key = "k" * 300
    headers = (
        f'{{"Authorization":"{SECRET}","{long_key}":"1","authorization":"b","{long_key}":"2","Authorization":"c"}}'
    )
    body = f'{{"name":"twice-headers","http":{{"base_url":"http://127.0.0.1:9/","headers":{headers}}}}}'
    response = _body(rest, "POST", "/api/resources", body)
    status = _refused_naming(response, "resource.http.headers")
    assert "'Authorization'" in status["message"] and "characters, cut)" in status["message"], status
    assert long_key not in response.text
    assert rest.get("/api/resources/twice-headers").status_code == 404


def test_fields_given_once_and_repeated_fields_given_twice_are_taken(rest: httpx.Client) -> None:
    # The same names in different objects (each node's, the workflow's own) are different fields.
    node_b = _NODE.replace('"name":"a"', '"name":"b"')
    body = f'{{"name":"once-each","nodes":[{_NODE},{node_b}],"labels":{{"name":"x"}},"metadata":{{"name":1}}}}'
    made = _body(rest, "POST", "/api/workflows", body)
    assert made.status_code == 200, made.text
    assert [n["name"] for n in made.json()["nodes"]] == ["a", "b"] and made.json()["labels"] == {"name": "x"}
    session = _body(rest, "POST", "/api/sessions", '{"user_id":"once-user","ttl":"60s","metadata":{"user_id":1}}')
    assert session.status_code == 200 and session.json()["user_id"] == "once-user", session.text
    # A repeated field given twice (by its two names, or one) takes both lists, as the transcoder
    # merges them; a map given twice with different keys takes every key.
    merged = _body(
        rest,
        "POST",
        "/api/workflows",
        f'{{"name":"twice-merged","nodes":[{_NODE}],"nodes":[{node_b}],"labels":{{"a":"1"}},"labels":{{"b":"2"}}}}',
    )
    assert merged.status_code == 200, merged.text
    assert [n["name"] for n in merged.json()["nodes"]] == ["a", "b"] and merged.json()["labels"] == {"a": "1", "b": "2"}
    service = _body(
        rest,
        "POST",
        "/api/services",
        '{"service_id":"twice-zones","endpoint":"http://127.0.0.1:9/","compliance_zones":["z1"],"complianceZones":["z2"]}',
    )
    assert service.status_code == 200, service.text
    assert sorted(rest.get("/api/services/twice-zones").json()["compliance_zones"]) == ["z1", "z2"]
