"""The Envoy config and the server agree on what the edge carries: message
and page sizes, header limits, waits, and which failures eject a server."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.rpc import error_details_pb2, status_pb2

from flowport.clients.client import _options
from flowport.server import pagination
from flowport.server.limits import MAX_MESSAGE_BYTES, MAX_METADATA_BYTES, MAX_PAGE_BYTES, MAX_WAIT
from flowport.server.settings import Settings
from flowport.transcoder.body_fields import json_names, lua_source, query_tables, tables, verbs
from flowport.transcoder.envoy_config import MAX_REQUEST_HEADERS_KB, render
from flowport.transcoder.local_replies import local_reply_config
from flowport.v1 import execution_pb2


def _config(**values: object) -> dict[str, Any]:
    return render(Settings.load(values, environ={}))


def _connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    filters = _connection_manager(config)["http_filters"]
    found: dict[str, Any] = next(f for f in filters if f["name"] == name)
    return found


def test_only_failures_to_reach_a_server_eject_it() -> None:
    outlier = _config()["static_resources"]["clusters"][0]["outlier_detection"]
    # Every answer, whatever gRPC status it carries, is the server's: never an ejection.
    assert outlier["split_external_local_origin_errors"] is True
    for answered in ("enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure", "enforcing_success_rate"):
        assert outlier[answered] == 0, answered
    assert outlier["enforcing_failure_percentage"] == 0
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100


def test_the_transcoder_carries_what_the_server_sends_and_takes() -> None:
    transcoder = _filter(_config(max_request_bytes=8 * 2**20), "envoy.filters.http.grpc_json_transcoder")
    config = transcoder["typed_config"]
    assert config["max_response_body_size"] >= MAX_MESSAGE_BYTES
    assert config["max_request_body_size"] == 8 * 2**20


def test_every_waiting_route_outlasts_the_longest_wait_and_its_idle_time() -> None:
    routes = _connection_manager(_config(unary_timeout=2.0, stream_idle_timeout=3.0, stream_heartbeat=1.0))[
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    create = next(r for r in routes if r["name"] == "/flowport.v1.ExecutionService/CreateExecution")
    for key in ("timeout", "idle_timeout"):
        assert float(create["route"][key].rstrip("s")) > MAX_WAIT, key


def test_headers_are_capped_below_the_servers_metadata_limit() -> None:
    manager = _connection_manager(_config())
    count = manager["common_http_protocol_options"]["max_headers_count"]
    assert manager["max_request_headers_kb"] == MAX_REQUEST_HEADERS_KB
    # What Envoy lets through, with gRPC's 32 bytes of accounting per header and
    # room for Envoy's own additions, stays under what the server takes.
    assert MAX_REQUEST_HEADERS_KB * 1024 + 32 * count + 4096 <= MAX_METADATA_BYTES


def test_a_refused_request_without_the_rest_mark_still_gets_json() -> None:
    mappers = local_reply_config()["mappers"]
    headers_too_large = next(
        m
        for m in mappers
        if m["filter"]["and_filter"]["filters"][0]
        .get("status_code_filter", {})
        .get("comparison", {})
        .get("value", {})
        .get("default_value")
        == 431
    )
    assert headers_too_large["body_format_override"]["json_format"]["details"][0]["reason"] == (
        "REQUEST_HEADERS_TOO_LARGE"
    )
    assert "header_filter" in str(headers_too_large["filter"]), "unmarked requests are told apart by content-type"


def test_grpc_callers_refused_by_unavailable_limits_get_the_reason_in_their_status_details() -> None:
    mappers = local_reply_config()["mappers"]
    rest, grpc_callers = mappers[0], mappers[1]
    assert "RLSE" in str(rest["filter"]) and "RLSE" in str(grpc_callers["filter"])
    assert "application/grpc" in str(grpc_callers["filter"]), "only gRPC callers"
    message = rest["body_format_override"]["json_format"]["message"]
    # The body of a gRPC local reply is its grpc-message, sent as plain text.
    assert grpc_callers["body_format_override"] == {"text_format_source": {"inline_string": message}}
    (header,) = [h["header"] for h in grpc_callers["headers_to_add"]]
    assert header["key"] == "grpc-status-details-bin"
    # gRPC's base64 (Envoy sends the value as written; a % would be a format specifier).
    value = header["value"]
    assert "%" not in value and "%" not in message
    status = status_pb2.Status.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
    info = error_details_pb2.ErrorInfo()
    assert status.code == 14 and status.message == message
    assert len(status.details) == 1 and status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("RATE_LIMIT_UNAVAILABLE", "envoy.flowport.dev")


def _execution(size: int, n: int) -> execution_pb2.Execution:
    execution = execution_pb2.Execution(execution_id=f"exe_{n}")
    execution.outputs.update({"a": {"result": "x" * size}})
    return execution


def _cursor(execution: execution_pb2.Execution) -> list[Any]:
    return [execution.execution_id]


def test_a_page_ends_before_it_outgrows_its_byte_budget() -> None:
    rows = [_execution(MAX_PAGE_BYTES // 3, n) for n in range(4)]
    page, token = pagination.page(rows, 10, {}, _cursor)
    assert [e.execution_id for e in page] == ["exe_0", "exe_1"]
    assert pagination.decode_token(token, {}) == ["exe_1"]


def test_a_page_always_holds_its_first_row_however_large() -> None:
    rows = [_execution(MAX_PAGE_BYTES + 10, 0), _execution(10, 1)]
    page, token = pagination.page(rows, 10, {}, _cursor)
    assert [e.execution_id for e in page] == ["exe_0"] and token


def test_a_small_page_is_cut_by_its_size_only() -> None:
    rows = [_execution(10, n) for n in range(3)]
    assert pagination.page(rows, 5, {}, _cursor) == (rows, "")
    page, token = pagination.page(rows, 2, {}, _cursor)
    assert page == rows[:2] and pagination.decode_token(token, {}) == ["exe_1"]


def test_the_sdk_receives_messages_as_large_as_the_api_sends() -> None:
    assert ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES) in _options(4, None)


def test_the_body_check_knows_every_route_with_a_body_and_both_field_names() -> None:
    types, all_routes = tables()
    routes = [route[:3] for route in all_routes]
    assert ("POST", "^/api/sessions$", "flowport.v1.Session") in routes
    # A variable may be an empty segment: the transcoder routes /workflows//execute too.
    assert ("POST", "^/workflows/([^/]*)/execute$", "flowport.v1.CreateExecutionRequest") in routes
    assert ("POST", "^/api/workflows:validate$", "flowport.v1.Workflow") in routes
    session = types["flowport.v1.Session"]
    assert session["user_id"] == session["userId"] == "=", "one scalar"
    assert session["ttl"] == "=", "a Duration is one JSON string"
    assert session["metadata"] == "", "a Struct takes any value"
    workflow = types["flowport.v1.Workflow"]
    assert workflow["nodes"] == "[]flowport.v1.Node" and "flowport.v1.Node" in types
    assert workflow["labels"] == "map:="
    assert types["flowport.v1.Node"]["config"] == ""
    source = lua_source()
    assert source.startswith("local TYPES = {") and "function envoy_on_request" in source
    # The verbs the transcoder splits off a path (only these: another stays part of the path).
    assert verbs() == ["cancel", "heartbeat", "redeliver", "revoke", "validate", "watch"]
    assert 'local VERBS = { ["cancel"] = true,' in source


def test_the_body_check_reads_both_names_of_a_field_as_one() -> None:
    # So that a body giving one field twice, by its two names, is refused as one field set twice.
    types, _ = tables()
    names = json_names()
    assert names["flowport.v1.CreateExecutionRequest"]["workflowId"] == "workflow_id"
    assert names["flowport.v1.RetryPolicy"]["maxAttempts"] == "max_attempts"
    assert "flowport.v1.Session" in names and "userId" in names["flowport.v1.Session"]
    # Only JSON names that differ, each of a field of its message, for every message the walk reaches.
    assert set(names) <= set(types)
    for message, renamed in names.items():
        assert renamed and all(json != proto for json, proto in renamed.items()), message
        assert all(types[message][json] == types[message][proto] for json, proto in renamed.items()), message
    assert "name" not in names.get("flowport.v1.Workflow", {}), "a one-word name is its own JSON name"
    source = lua_source()
    assert "local JSON_NAMES = {" in source and '["workflowId"] = "workflow_id"' in source
    assert source.index("local JSON_NAMES = {") < source.index("local FIELDS = {}")


def test_the_query_check_knows_each_routes_fields_by_both_names_and_which_are_repeated() -> None:
    from flowport.transcoder.http_rules import methods

    types, routes, suspects = query_tables()
    recent = types["flowport.v1.ListRecentEventsRequest"]
    assert recent["page_size"] == recent["pageSize"] == "page_size"
    # Kailash's names are fields of their own, which the server merges: not one field twice.
    assert recent["count"] == "count"
    assert recent["types"] is recent["event_types"] is recent["eventTypes"] is False, "repeated: several values"
    assert types["flowport.v1.ListServicesRequest"]["capabilities"] is False
    # Into the messages a request holds (by proto names), not into repeated ones, maps or free-form values.
    create = types["flowport.v1.CreateSessionRequest"]
    assert create["session.userId"] == create["session.user_id"] == "session.user_id"
    assert create["session.ttl"] == "session.ttl", "a Duration is one value"
    assert not [k for k in create if k.startswith("session.metadata")]
    workflow = types["flowport.v1.CreateWorkflowRequest"]
    assert not [k for k in workflow if k.startswith(("workflow.nodes", "workflow.labels"))]
    # Every REST binding, with the fields its path binds.
    assert len(routes) == sum(len(m.bindings) for m in methods())
    assert ("GET", "^/api/sessions/[^/]*$", "flowport.v1.GetSessionRequest", ("session_id",)) in routes
    assert {"sessionid", "workflowid", "executionid"} <= suspects and "pagesize" not in suspects
    source = lua_source()
    assert "local QUERY_TYPES = {" in source and 'local QUERY_SUSPECTS = { ["deliveryid"] = true,' in source


def test_the_body_check_knows_each_field_a_path_binds_that_the_body_can_set_too() -> None:
    from google.protobuf import descriptor_pb2

    from flowport.transcoder.body_fields import BodyRoute, _messages
    from flowport.transcoder.http_rules import methods

    _, routes = tables()
    # Derived here from the HTTP rules as the filter needs it: a route whose body is "*" and whose
    # path binds a field, or whose body field holds one the path binds.
    expected = {
        (b.verb.upper(), m.input_type, tuple(p for p in b.path_params if b.body == "*" or p.startswith(b.body + ".")))
        for m in methods()
        for b in m.bindings
        if b.body
    }
    bound = {(r.method, r.message, tuple(_leaves(r.bound_keys))) for r in routes if r.bound_keys}
    assert bound == {(verb, message, params) for verb, message, params in expected if params}
    assert {r.pattern for r in routes if r.bound_keys} == {
        "^/api/keys/([^/]*):revoke$",
        "^/workflows/([^/]*)/execute$",
        "^/([^/]*)/execute$",
        "^/api/executions/([^/]*):cancel$",
        "^/api/services/([^/]*):heartbeat$",
        "^/api/secrets/([^/]*)$",
        "^/api/webhooks/([^/]*)/deliveries/([^/]*):redeliver$",
    }
    revoke = next(r for r in routes if r.message == "flowport.v1.RevokeApiKeyRequest")
    assert revoke == BodyRoute(
        "POST",
        "^/api/keys/([^/]*):revoke$",
        "flowport.v1.RevokeApiKeyRequest",
        "flowport.v1.RevokeApiKeyRequest",
        "",
        ("key_id",),
        {"key_id": "key_id", "keyId": "key_id"},
    )
    redeliver = next(r for r in routes if r.message == "flowport.v1.RedeliverWebhookDeliveryRequest")
    assert redeliver.bound == ("webhook_id", "delivery_id")
    assert redeliver.bound_keys["deliveryId"] == redeliver.bound_keys["delivery_id"] == "delivery_id"
    # A body field's route: its fields are the query's "session."…; PUT /api/resources/{name} binds
    # the request's name, which its body (the resource) does not set: nothing bound, no capture.
    session = next(r for r in routes if r.message == "flowport.v1.CreateSessionRequest")
    assert session[2:] == ("flowport.v1.Session", "flowport.v1.CreateSessionRequest", "session.", (), {})
    update = next(r for r in routes if r.message == "flowport.v1.UpdateResourceRequest")
    assert (update.pattern, update.bound_keys) == ("^/api/resources/[^/]*$", {})
    # The filter takes a body's value for a bound field when it is the path's very string: every
    # field a path binds is a string.
    messages = _messages(None)
    for route in routes:
        for member in _leaves(route.bound_keys):
            field = next(f for f in messages[route.message].field if f.name == member)
            assert field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING, (route.message, member)
            assert field.label != descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED, (route.message, member)
    source = lua_source()
    assert (
        '{ "POST", "^/api/keys/([^/]*):revoke$", "flowport.v1.RevokeApiKeyRequest", '
        '"flowport.v1.RevokeApiKeyRequest", "", { "key_id" }, { ["keyId"] = "key_id", ["key_id"] = "key_id" } },'
    ) in source
    unbound = '"flowport.v1.Session", "flowport.v1.CreateSessionRequest", "session.", {  }, false },'
    assert f'{{ "POST", "^/api/sessions$", {unbound}' in source


def test_bound_keys_reach_a_field_inside_the_body_by_both_names_of_each_field() -> None:
    # No route binds a field inside a message today; one that did (`{session.user_id}`, body "*"
    # or "session") would have the body keys that reach it by both names at every level.
    from flowport.transcoder.body_fields import _add_bound_keys, _messages

    keys: dict[str, object] = {}
    _add_bound_keys(_messages(None), "flowport.v1.CreateSessionRequest", "session.user_id", "session.user_id", keys)
    inner = {"user_id": "session.user_id", "userId": "session.user_id"}
    assert keys == {"session": inner}
    keys = {}
    _add_bound_keys(_messages(None), "flowport.v1.Session", "user_id", "session.user_id", keys)
    assert keys == inner


def _leaves(keys: object) -> list[str]:
    """The fields a BoundKeys table ends at, each once, in order."""
    found: list[str] = []
    assert isinstance(keys, dict)
    for value in keys.values():
        for leaf in [value] if isinstance(value, str) else _leaves(value):
            if leaf not in found:
                found.append(leaf)
    return found


def test_the_sdk_refuses_unknown_fields_in_a_workflow_given_as_json() -> None:
    # As REST does: a misspelt or misplaced key is an error, not silently dropped.
    from google.protobuf import json_format

    from flowport.clients.runs import _workflow

    for config, field in (
        ({"name": "w", "nodez": []}, "nodez"),
        ({"name": "w", "nodes": [{"type": "PythonCodeNode", "name": "a", "timeot": "1s"}]}, "timeot"),
    ):
        with pytest.raises(json_format.ParseError, match=field):
            _workflow(config)


class _Called:
    """The part of a call's context time_limit reads: its metadata."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


@pytest.mark.parametrize("unary_timeout", [2.0, 30.0, 600.0])
def test_the_server_answers_every_unary_call_before_its_route_times_out(unary_timeout: float) -> None:
    # Envoy sends each route's timeout as x-envoy-expected-rq-timeout-ms; a timeout counts toward
    # ejecting the server, an answer never does, so the server's limit ends sooner.
    from flowport.server.interceptor import ENVOY_TIMEOUT_KEY, time_limit

    routes = _connection_manager(_config(unary_timeout=unary_timeout))["route_config"]["virtual_hosts"][0]["routes"]
    unary = [r for r in routes if r["name"].startswith("/flowport.v1.") and r["route"]["timeout"] != "0s"]
    assert unary
    for route in unary:
        seconds = float(route["route"]["timeout"].rstrip("s"))
        limit = time_limit(_Called((ENVOY_TIMEOUT_KEY, str(round(seconds * 1000)))))
        assert limit is not None and seconds - 1.0 <= limit < seconds, (route["name"], limit)
        if route["name"] == "/flowport.v1.ExecutionService/CreateExecution":
            assert limit > MAX_WAIT, "the longest wait still ends with the execution"
    # Without Envoy's header (a direct gRPC caller) the call has no limit of the server's; a value
    # Envoy never sends is none either.
    for metadata in ((), ((ENVOY_TIMEOUT_KEY, "²"),), ((ENVOY_TIMEOUT_KEY, "9" * 5000),)):
        assert time_limit(_Called(*metadata)) is None


def _retry_on(route: dict[str, Any]) -> set[str]:
    return set(route["route"]["retry_policy"]["retry_on"].split(","))


def test_only_calls_safe_to_repeat_are_retried_after_they_reached_a_server() -> None:
    from flowport.transcoder.request_ids import MARK_HEADER

    config = _config()
    routes = _connection_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    by_name = {r["name"]: r for r in routes}
    reached = {"reset", "unavailable"}
    # Idempotent calls, streams included, are retried on another server whatever happened.
    for name in ("/flowport.v1.SessionService/GetSession", "/flowport.v1.EventService/StreamEvents"):
        assert reached <= _retry_on(by_name[name]), name
        predicates = by_name[name]["route"]["retry_policy"]["retry_host_predicate"]
        assert predicates[0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    # A create without a request_id only when it never reached a server.
    for name in ("/flowport.v1.SessionService/CreateSession", "/flowport.v1.ExecutionService/CreateExecution"):
        assert not reached & _retry_on(by_name[name]), name
        assert "connect-failure" in _retry_on(by_name[name])
    # A create whose body sets request_id is marked, and its twin route, matched first, retries it as idempotent.
    marked = by_name["/flowport.v1.ExecutionService/CreateExecution+request_id"]
    assert routes.index(marked) < routes.index(by_name["/flowport.v1.ExecutionService/CreateExecution"])
    assert marked["match"]["headers"] == [{"name": MARK_HEADER, "present_match": True}]
    assert reached <= _retry_on(marked)
    # The mark is Envoy's own: removed from what clients send, set after the transcoder has made REST bodies gRPC.
    filters = [f["name"] for f in _connection_manager(config)["http_filters"]]
    assert filters.index("flowport.request_ids") == filters.index("envoy.filters.http.grpc_json_transcoder") + 1
    removed = _filter(config, "envoy.filters.http.header_mutation")["typed_config"]["mutations"]["request_mutations"]
    assert {"remove": MARK_HEADER} in removed


def test_a_stopping_server_drains_for_longer_than_envoys_health_checks_take_to_notice() -> None:
    check = _config()["static_resources"]["clusters"][0]["health_checks"][0]
    # A draining server answers NOT_SERVING, which Envoy acts on at its next check (whatever
    # unhealthy_threshold says: that counts checks left unanswered, which one stall must not fill).
    noticed = float(check["interval"].rstrip("s")) + float(check["timeout"].rstrip("s"))
    assert Settings.load({}, environ={}).drain_seconds > noticed
    assert check["unhealthy_threshold"] > 1


def test_retries_get_a_budget_and_streams_room_beyond_envoys_defaults() -> None:
    # Envoy's defaults: 1024 requests and 3 retries in flight for the whole cluster.
    [cluster] = [c for c in _config()["static_resources"]["clusters"] if c["name"] == "flowport_grpc"]
    [thresholds] = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] > 1024 and thresholds["max_pending_requests"] > 1024
    assert thresholds["retry_budget"]["min_retry_concurrency"] > 3


@pytest.mark.parametrize(
    ("values", "gateway", "client", "address"),
    [
        ({}, 2000, 500, 500),  # the defaults: the address's 4x 500 would be the whole gateway's bucket
        ({"rate_limit_client_max_requests": 100}, 2000, 100, 400),  # within the share: as configured
        ({"rate_limit_address_max_requests": 5000, "rate_limit_client_share": 1.0}, 2000, 500, 2000),
        ({"rate_limit_max_requests": 3, "rate_limit_client_max_requests": 8}, 3, 1, 1),  # never below one
    ],
)
def test_no_caller_may_spend_more_than_its_share_of_the_gateways_bucket(
    values: dict[str, object], gateway: int, client: int, address: int
) -> None:
    limit = _filter(_config(**values), "envoy.filters.http.local_ratelimit")["typed_config"]
    assert limit["token_bucket"]["tokens_per_fill"] == gateway
    per_client, keyless, per_address = (d["token_bucket"]["tokens_per_fill"] for d in limit["descriptors"])
    assert (per_client, keyless, per_address) == (client, client, address)


def test_the_executions_bucket_is_shared_the_same_way() -> None:
    config = _config(rate_limit_execution_max_requests=500)
    routes = _connection_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    limits = [
        r["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
        for r in routes
        if "envoy.filters.http.local_ratelimit" in r.get("typed_per_filter_config", {})
        and "descriptors" in r["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
    ]
    assert limits, "no route has a bucket of its own"
    for limit in limits:
        assert limit["token_bucket"]["tokens_per_fill"] == 500
        assert [d["token_bucket"]["tokens_per_fill"] for d in limit["descriptors"]] == [125, 125, 125]
