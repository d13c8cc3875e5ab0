"""Errors never echo a client's value whole, and a status always fits in gRPC trailers."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2

from flowport.clients import AsyncClient
from flowport.server import errors
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.validation import MAX_NODES, find_cycle, validate
from flowport.server.errors import InvalidArgument, NotFound, shown
from flowport.server.nodes.base import MAX_MESSAGE_CHARS, NodeError
from flowport.server.nodes.http import HTTPRequestNode, _parse_url
from flowport.server.nodes.python_code import PythonCodeNode
from flowport.v1 import event_pb2, execution_pb2, workflow_pb2

LONG = "x" * 40_000


def test_shown_quotes_a_short_value_as_repr() -> None:
    assert shown("abc") == "'abc'"
    assert shown(7) == "7"


def test_shown_cuts_a_long_string_and_says_so() -> None:
    text = shown(LONG)
    assert text == "'" + "x" * 200 + "…' (40000 characters, cut)"


def test_shown_cuts_escapes_too() -> None:
    text = shown("\x00" * 1000)  # each character is 4 in the repr
    assert len(text) < 260 and text.endswith("(1000 characters, cut)")


def test_shown_cuts_other_values_by_their_repr() -> None:
    text = shown(list(range(10_000)))
    assert len(text) < 260 and text.endswith("characters, cut)")


def _unpacked(status: object) -> dict[str, object]:
    found: dict[str, object] = {}
    for detail in status.details:  # type: ignore[attr-defined]
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            message = kind()
            if detail.Unpack(message):
                found[kind.__name__] = message
    return found


def test_every_error_caps_its_message_violations_and_metadata() -> None:
    error = InvalidArgument(
        f"name {LONG} is bad", violations=[(LONG, LONG)], metadata={"name": LONG, LONG: "value"}, reason=LONG
    )
    assert len(error.message.encode()) <= errors.MAX_MESSAGE_BYTES and error.message.endswith("characters, cut)")
    ((field, description),) = error.violations
    assert len(field) <= errors.MAX_FIELD_CHARS and len(description) <= errors.MAX_DESCRIPTION_CHARS
    assert all(len(k) <= errors.MAX_METADATA_KEY_CHARS for k in error.metadata)
    assert all(len(v) <= errors.MAX_METADATA_VALUE_CHARS for v in error.metadata.values())
    assert len(error.reason) <= errors.MAX_METADATA_KEY_CHARS


def test_a_message_of_wide_characters_is_capped_in_bytes() -> None:
    error = NotFound("é" * 5000)
    assert len(error.message.encode()) <= errors.MAX_MESSAGE_BYTES


def test_a_status_never_exceeds_its_size_and_counts_what_it_left_out() -> None:
    error = InvalidArgument(
        "workflow is not valid",
        violations=[(f"nodes[{i}].type", "ü" * 500) for i in range(500)],
        metadata={f"k{i}": "v" * 250 for i in range(40)},
    )
    status = error.to_status()
    assert status.ByteSize() <= errors.MAX_STATUS_BYTES
    found = _unpacked(status)
    info, bad_request = found["ErrorInfo"], found["BadRequest"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and isinstance(bad_request, error_details_pb2.BadRequest)
    kept = len(bad_request.field_violations)
    assert kept >= 1 and bad_request.field_violations[0].field == "nodes[0].type", "the first violations are kept"
    assert info.metadata[errors.OMITTED_KEY] == str(500 - kept)


def test_a_small_status_is_left_whole() -> None:
    error = InvalidArgument("bad", violations=[("a", "required"), ("b", "too long")], metadata={"k": "v"})
    found = _unpacked(error.to_status())
    info, bad_request = found["ErrorInfo"], found["BadRequest"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and isinstance(bad_request, error_details_pb2.BadRequest)
    assert dict(info.metadata) == {"k": "v"}
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("a", "required"), ("b", "too long")]


async def test_the_trailers_of_a_huge_error_reach_a_grpc_client() -> None:
    # gRPC clients refuse trailers past 8 KiB (randomly up to 16 KiB); the
    # caps keep every status below that, whatever the error carried.
    from flowport.clients import ApiError
    from flowport.server.interceptor import ErrorInterceptor
    from flowport.server.metrics import RequestMetrics

    async def fail(request: bytes, context: object) -> bytes:
        raise InvalidArgument(
            "ü" * 50_000, violations=[(LONG, "é" * 5000)] * 100, metadata={f"k{i}": LONG for i in range(50)}
        )

    server = grpc.aio.server(interceptors=[ErrorInterceptor(RequestMetrics())])
    handler = grpc.unary_unary_rpc_method_handler(fail)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Big", {"Fail": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(20):  # past the soft limit, gRPC refuses at random: never here
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test.Big/Fail")(b"")
                error = ApiError.from_rpc_error(caught.value)
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
                assert error.message.endswith("(50000 characters, cut)")
                assert error.violations and "characters, cut)" in error.violations[0][0]
    finally:
        await server.stop(None)


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return NodeRegistry.default()


def _chain(count: int) -> workflow_pb2.Workflow:
    workflow = workflow_pb2.Workflow(name="chain")
    for i in range(count):
        node = workflow.nodes.add(type="PythonCodeNode", name=f"n{i}")
        node.config.update({"code": "result = 1"})
        if i:
            workflow.connections.add(from_node=f"n{i - 1}", from_output="result", to_node=f"n{i}", to_input="x")
    return workflow


def test_too_many_nodes_is_one_violation_checked_first(registry: NodeRegistry) -> None:
    assert validate(_chain(1000), registry) == [("nodes", f"at most {MAX_NODES} nodes, got 1000")]


def test_a_chain_at_the_node_limit_is_valid(registry: NodeRegistry) -> None:
    assert validate(_chain(MAX_NODES), registry) == []


def test_the_cycle_check_does_not_recurse() -> None:
    count = 20_000  # far past Python's recursion limit
    nodes = [f"n{i}" for i in range(count)]
    edges = {f"n{i}": [(f"n{i + 1}", i)] for i in range(count - 1)}
    assert find_cycle(nodes, edges) is None
    edges[f"n{count - 1}"] = [("n0", count - 1)]
    found = find_cycle(nodes, edges)
    assert found is not None
    path, index = found
    assert (len(path), path[0], path[-1], index) == (count + 1, "n0", "n0", count - 1)


def test_a_long_cycle_is_described_by_its_start_and_length(registry: NodeRegistry) -> None:
    workflow = _chain(300)
    workflow.connections.add(from_node="n299", from_output="result", to_node="n0", to_input="x")
    ((where, description),) = validate(workflow, registry)
    assert where == "connections[299]"
    assert description.startswith("creates a cycle: n0 → n1 → ") and "(300 nodes)" in description
    assert len(description) < 200


def test_unknown_node_types_and_ids_are_shown_cut(registry: NodeRegistry) -> None:
    workflow = workflow_pb2.Workflow(name="w")
    workflow.nodes.add(type=LONG, name="a")
    workflow.connections.add(from_node=LONG, from_output="result", to_node="a", to_input="x")
    problems = dict(validate(workflow, registry))
    assert problems["nodes[0].type"].startswith("unknown node type 'xxx")
    assert "(40000 characters, cut)" in problems["nodes[0].type"]
    assert "(40000 characters, cut)" in problems["connections[0].from_node"]
    assert all(len(d) < 1000 for d in problems.values())


def test_schema_errors_do_not_quote_the_value_whole() -> None:
    problems = dict(HTTPRequestNode.validate_config({"url": "http://h", "method": LONG, LONG: 1}, "c"))
    assert problems["c.method"].startswith("'xxx") and "(40000 characters, cut) is not one of" in problems["c.method"]
    assert "(40000 characters, cut)" in problems["c"] and "does not take it" in problems["c"]
    too_long = dict(PythonCodeNode.validate_config({"code": "y" * 100_001}, "c"))
    assert too_long["c.code"].endswith("(100001 characters, cut) is too long")


def test_a_syntax_error_quoting_the_code_is_cut() -> None:
    name = "a" * 40_000  # twice in the code, within its 100,000 characters
    code = f"def f({name}):\n    global {name}\n"
    ((where, description),) = PythonCodeNode.validate_config({"code": code}, "c")
    assert where == "c.code" and description.startswith("SyntaxError: name 'aaa")
    assert len(description) < 300 and "characters, cut)" in description


def test_a_node_error_about_a_missing_parameter_quotes_its_name_cut() -> None:
    from flowport.server.nodes.base import NodeError
    from flowport.server.nodes.substitution import lookup

    with pytest.raises(NodeError) as caught:
        lookup("p" * 40_000, {})
    assert caught.value.reason == "UNRESOLVED_REFERENCE"
    assert len(caught.value.message) < 300 and "(40000 characters, cut)" in caught.value.message


def test_an_error_keeps_its_first_violations_and_counts_the_rest() -> None:
    many = ((f"connections[{i}].from_node", "required") for i in range(1_000_000))
    error = InvalidArgument("workflow is not valid", violations=many)
    assert len(error.violations) == errors.MAX_VIOLATIONS and error.violations_omitted == 1_000_000 - 100
    listed = _unpacked(error.to_status())
    info, bad_request = listed["ErrorInfo"], listed["BadRequest"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and isinstance(bad_request, error_details_pb2.BadRequest)
    shown_count = len(bad_request.field_violations)
    assert int(info.metadata[errors.OMITTED_KEY]) == 1_000_000 - shown_count
    # A list is counted by its length, not walked.
    assert InvalidArgument("x", violations=[("f", "d")] * 500).violations_omitted == 400


def test_digits_only_ascii_ones_index_a_list() -> None:
    # "²".isdigit() is true but int() refuses it; 5,000 digits are past int()'s limit.
    from flowport.server.nodes.paths import MISSING, lookup, steps
    from flowport.server.nodes.substitution import lookup as parameter

    assert lookup([1, 2], ["²"]) is MISSING and lookup([1, 2], ["1" * 5000]) is MISSING
    assert lookup([1, 2], ["1"]) == 2 and steps("a[1]") == ["a", 1]
    assert steps("a[٣]") == ["a", "٣"]  # an Arabic-Indic digit is a name, not index 3
    for name in ("a.²", "a." + "1" * 5000):
        with pytest.raises(NodeError) as caught:
            parameter(name, {"a": [1]})
        assert caught.value.reason == "UNRESOLVED_REFERENCE"


async def test_a_content_length_int_cannot_read_is_left_to_the_capped_read() -> None:
    import httpx

    from flowport.server.nodes.http import _read_capped

    url = httpx.URL("http://example.test/")
    for declared in ("²".encode("latin-1"), b"9" * 5000):
        response = httpx.Response(200, headers=[(b"content-length", declared)], stream=httpx.ByteStream(b"ok"))
        assert await _read_capped(response, 1024, False, url) == b"ok"


def test_a_node_error_keeps_at_most_its_cap_of_message() -> None:
    # A node's message goes into the execution, two events and each webhook's delivery.
    error = NodeError("boom: " + LONG)
    assert len(error.message) <= MAX_MESSAGE_CHARS and error.message.endswith("(40006 characters, cut)")
    assert str(error) == error.message
    assert NodeError("short").message == "short"


async def test_a_huge_url_is_not_quoted_whole_in_the_http_nodes_error() -> None:
    with pytest.raises(NodeError) as caught:
        _parse_url("ftp://" + LONG)
    assert caught.value.reason == "HTTP_INVALID_URL"
    assert len(caught.value.message) < 400 and "(40006 characters, cut)" in caught.value.message
    with pytest.raises(NodeError) as invalid:
        _parse_url("http://host:notaport/" + LONG)
    assert len(invalid.value.message) < 700, invalid.value.message


async def test_an_executions_error_from_user_code_stays_within_the_cap(admin: AsyncClient) -> None:
    """Code raising with a megabyte of text: the execution, its node run and its failure event each
    carry at most the cap, not the text."""
    workflow = workflow_pb2.Workflow(workflow_id="loud", name="loud")
    json_format.ParseDict(
        {"nodes": [{"name": "n", "type": "PythonCodeNode", "config": {"code": "raise ValueError('y' * 1_000_000)"}}]},
        workflow,
    )
    await admin.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
    done = await admin.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="loud", wait=True))
    assert done.state == execution_pb2.Execution.STATE_FAILED
    assert "ValueError" in done.error.message and len(done.error.message) <= MAX_MESSAGE_CHARS
    assert all(len(run.error.message) <= MAX_MESSAGE_CHARS for run in done.node_runs)
    recent = await admin.events.ListRecentEvents(event_pb2.ListRecentEventsRequest(page_size=20))
    failed = [e for e in recent.events if e.type in ("execution.failed", "node.failed")]
    assert failed and all(e.ByteSize() < 3 * MAX_MESSAGE_CHARS for e in failed)
