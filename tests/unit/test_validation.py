"""Workflow validation: one test per rejection rule, each checking the field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, json_format

from flowport.server.engine.plan import InvalidWorkflow, compile_plan
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.validation import (
    MAX_CONFIG_BYTES,
    MAX_CONFIGS_BYTES,
    MAX_CONNECTIONS,
    MAX_PATH_CHARS,
    MAX_PROBLEMS,
    stored_form,
    validate,
    workflow_id_of,
)
from flowport.server.nodes.base import MAX_CONFIG_PROBLEMS
from flowport.server.nodes.http import HTTPRequestNode
from flowport.v1 import workflow_pb2

# The seed's dynamic_data_pipeline example, as-is.
SEED_PIPELINE: dict[str, Any] = {
    "name": "dynamic_data_pipeline",
    "description": "Dynamically created data processing pipeline",
    "nodes": [
        {
            "type": "HTTPRequestNode",
            "name": "fetch_data",
            "config": {"url": "https://api.example.com/data", "method": "GET"},
        },
        {
            "type": "PythonCodeNode",
            "name": "process_data",
            "config": {"code": "result = {'processed': len(data), 'timestamp': datetime.now().isoformat()}"},
        },
    ],
    "connections": [
        {"from_node": "fetch_data", "from_output": "response", "to_node": "process_data", "to_input": "data"}
    ],
}


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return NodeRegistry.default()


def workflow(data: dict[str, Any]) -> workflow_pb2.Workflow:
    return json_format.ParseDict(data, workflow_pb2.Workflow())


def paths(data: dict[str, Any], registry: NodeRegistry) -> dict[str, str]:
    return dict(validate(workflow(data), registry))


def code_node(name: str, code: str = "result = 1", **extra: Any) -> dict[str, Any]:
    return {"type": "PythonCodeNode", "name": name, "config": {"code": code}, **extra}


def test_the_seed_pipeline_is_valid(registry: NodeRegistry) -> None:
    assert validate(workflow(SEED_PIPELINE), registry) == []


def test_node_ids_may_be_given_as_id(registry: NodeRegistry) -> None:
    data = {"name": "w", "nodes": [{"type": "PythonCodeNode", "id": "a", "config": {"code": "result = 1"}}]}
    assert validate(workflow(data), registry) == []


def test_unknown_node_type(registry: NodeRegistry) -> None:
    problems = paths({"name": "w", "nodes": [{"type": "TeleportNode", "name": "a"}]}, registry)
    assert "unknown node type 'TeleportNode'" in problems["nodes[0].type"]


def test_missing_node_type_and_id(registry: NodeRegistry) -> None:
    problems = paths({"name": "w", "nodes": [{"config": {}}]}, registry)
    assert problems["nodes[0].type"] == "required"
    assert "identifier" in problems["nodes[0].name"]


def test_duplicate_node_ids(registry: NodeRegistry) -> None:
    problems = paths({"name": "w", "nodes": [code_node("a"), code_node("a")]}, registry)
    assert "duplicate node id 'a' (also nodes[0])" in problems["nodes[1].name"]


def test_name_and_id_that_disagree(registry: NodeRegistry) -> None:
    problems = paths({"name": "w", "nodes": [code_node("a", id="b")]}, registry)
    assert "differs from name" in problems["nodes[0].id"]


def test_unknown_node_ids_in_connections(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a")],
        "connections": [{"from_node": "ghost", "from_output": "result", "to_node": "b", "to_input": "x"}],
    }
    problems = paths(data, registry)
    assert "no node with id 'ghost'" in problems["connections[0].from_node"]
    assert "no node with id 'b'" in problems["connections[0].to_node"]


def test_cycles(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), code_node("b"), code_node("c")],
        "connections": [
            {"from_node": "a", "from_output": "result", "to_node": "b", "to_input": "x"},
            {"from_node": "b", "from_output": "result", "to_node": "c", "to_input": "x"},
            {"from_node": "c", "from_output": "result", "to_node": "a", "to_input": "x"},
        ],
    }
    problems = paths(data, registry)
    assert problems == {"connections[2]": "creates a cycle: a → b → c → a"}


def test_self_loop(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a")],
        "connections": [{"from_node": "a", "from_output": "result", "to_node": "a", "to_input": "x"}],
    }
    assert "to itself" in paths(data, registry)["connections[0]"]


def test_missing_required_config(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), {"type": "HTTPRequestNode", "name": "h", "config": {"method": "GET"}}],
    }
    assert "required" in paths(data, registry)["nodes[1].config.url"]


def test_wrong_config_types(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [{"type": "HTTPRequestNode", "name": "h", "config": {"url": "https://x.test", "timeout": "slow"}}],
    }
    assert "slow" in paths(data, registry)["nodes[0].config.timeout"]


def test_syntax_error_in_code_is_found_before_running(registry: NodeRegistry) -> None:
    problems = paths({"name": "w", "nodes": [code_node("a", "result = (")]}, registry)
    assert problems["nodes[0].config.code"].startswith("SyntaxError")
    # A problem of the whole text has no line, and says none.
    nul = paths({"name": "w", "nodes": [code_node("a", "result = 1\x00")]}, registry)["nodes[0].config.code"]
    assert nul == "SyntaxError: source code string cannot contain null bytes"


def test_connection_from_an_output_the_node_does_not_declare(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), code_node("b")],
        "connections": [{"from_node": "a", "from_output": "response", "to_node": "b", "to_input": "x"}],
    }
    assert "PythonCodeNode has no output 'response'" in paths(data, registry)["connections[0].from_output"]


def test_connection_to_an_input_the_node_does_not_declare(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), {"type": "TransformNode", "name": "t", "config": {"mapping": {"x": "y"}}}],
        "connections": [{"from_node": "a", "from_output": "result", "to_node": "t", "to_input": "payload"}],
    }
    assert "TransformNode has no input 'payload'" in paths(data, registry)["connections[0].to_input"]


def test_an_input_bound_twice(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), code_node("b"), code_node("c")],
        "connections": [
            {"from_node": "a", "from_output": "result", "to_node": "c", "to_input": "x"},
            {"from_node": "b", "from_output": "result", "to_node": "c", "to_input": "x"},
        ],
    }
    assert "already bound by connections[0]" in paths(data, registry)["connections[1].to_input"]


def test_bad_workflow_name_and_empty_nodes(registry: NodeRegistry) -> None:
    problems = paths({"name": "   ", "nodes": []}, registry)
    assert problems["name"] == "required"
    assert problems["nodes"] == "at least one node is required"


@pytest.mark.parametrize(
    ("name", "given_id", "made_id"),
    [
        ("plain_name", "", "plain_name"),
        ("Tenant Isolation Workflow", "", "Tenant_Isolation_Workflow"),
        ("Tenant Isolation Workflow", "tenant_isolation", "tenant_isolation"),
        ("  -- rates: EUR/USD --  ", "", "rates_EUR_USD"),
        ("ünïcode name", "", "n_code_name"),
    ],
)
def test_names_are_free_text_and_ids_are_made_from_them(
    registry: NodeRegistry, name: str, given_id: str, made_id: str
) -> None:
    workflow = json_format.ParseDict(
        {"name": name, "workflow_id": given_id, "nodes": [code_node("a")]}, workflow_pb2.Workflow()
    )
    assert not validate(workflow, registry)
    assert workflow_id_of(workflow) == made_id


@pytest.mark.parametrize(
    ("data", "path", "says"),
    [
        ({"name": "x" * 129}, "name", "at most 128 characters"),
        ({"name": "line\nbreak"}, "name", "no control characters"),
        ({"name": "ok", "workflow_id": "no spaces"}, "workflow_id", "letters, digits"),
        ({"name": "日本"}, "workflow_id", "give workflow_id"),
    ],
)
def test_names_and_ids_that_are_refused(registry: NodeRegistry, data: dict[str, str], path: str, says: str) -> None:
    assert says in paths({**data, "nodes": [code_node("a")]}, registry)[path]


def test_kailash_parameters_are_the_config_and_are_stored_as_it(registry: NodeRegistry) -> None:
    node = {"type": "PythonCodeNode", "name": "a", "parameters": {"code": "result = 1"}}
    workflow = json_format.ParseDict({"name": "p", "nodes": [node]}, workflow_pb2.Workflow())
    assert not validate(workflow, registry)
    stored_form(workflow)
    assert json_format.MessageToDict(workflow.nodes[0].config) == {"code": "result = 1"}
    assert not workflow.nodes[0].HasField("parameters")
    assert workflow.workflow_id == "p"


def test_parameters_problems_are_reported_where_they_were_given(registry: NodeRegistry) -> None:
    bad = {"type": "PythonCodeNode", "name": "a", "parameters": {"code": 5}}
    assert any(p.startswith("nodes[0].parameters") for p in paths({"name": "p", "nodes": [bad]}, registry))
    both = {"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}, "parameters": {"code": "x = 1"}}
    assert "not both" in paths({"name": "p", "nodes": [both]}, registry)["nodes[0].parameters"]


def test_timeout_and_retry_bounds(registry: NodeRegistry) -> None:
    too_long = code_node("a")
    wf = workflow(
        {
            "name": "w",
            "nodes": [
                too_long,
                {"type": "HTTPRequestNode", "name": "h", "config": {"url": "https://x.test", "method": "POST"}},
            ],
        }
    )
    wf.nodes[0].timeout.CopyFrom(duration_pb2.Duration(seconds=100_000))
    wf.nodes[0].retry.max_attempts = 11
    wf.nodes[1].retry.max_attempts = 3
    problems = dict(validate(wf, registry))
    assert "at most 300s" in problems["nodes[0].timeout"]
    assert problems["nodes[0].retry.max_attempts"] == "between 0 and 10"
    assert "not safe to run twice" in problems["nodes[1].retry"]


def test_every_problem_is_reported_at_once(registry: NodeRegistry) -> None:
    data = {
        "name": "",
        "nodes": [{"type": "Nope", "name": "a"}, code_node("a", "x = ("), {"type": "HTTPRequestNode", "name": "h"}],
        "connections": [{"from_node": "a", "from_output": "result", "to_node": "zz", "to_input": "x"}],
    }
    problems = paths(data, registry)
    assert {
        "name",
        "nodes[0].type",
        "nodes[1].name",
        "nodes[1].config.code",
        "nodes[2].config.url",
        "connections[0].to_node",
    } <= set(problems)


def test_compiling_an_invalid_workflow_raises_with_the_violations(registry: NodeRegistry) -> None:
    with pytest.raises(InvalidWorkflow) as caught:
        compile_plan(workflow({"name": "w", "nodes": [{"type": "Nope", "name": "a"}]}), registry)
    assert caught.value.violations[0][0] == "nodes[0].type"


def test_plan_orders_nodes_and_binds_inputs(registry: NodeRegistry) -> None:
    plan = compile_plan(workflow(SEED_PIPELINE), registry)
    # Worked out as it is compiled (off the event loop for a large workflow), not at its first run.
    assert "inputs_schema" in plan.__dict__ and "required_by" in plan.__dict__
    assert plan.order == ("fetch_data", "process_data")
    binding = plan.nodes["process_data"].inbound[0]
    assert (binding.from_node, binding.path, binding.to_input) == ("fetch_data", ("response",), "data")
    assert plan.nodes["fetch_data"].downstream == ("process_data",)
    assert plan.inputs_schema["required"] == []


def test_python_code_inputs_are_its_free_variables(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [
            code_node("first", "import math\ndef scale(v):\n    return v * factor\nresult = [scale(i) for i in items]"),
            code_node("second", "result = {'n': len(data), 'at': datetime.now().isoformat()}"),
        ],
        "connections": [{"from_node": "first", "from_output": "result", "to_node": "second", "to_input": "data"}],
    }
    plan = compile_plan(workflow(data), registry)
    # `data` comes from a connection; datetime, len and math are provided.
    assert plan.inputs_schema["required"] == ["factor", "items"]
    # A module's dunder names are the interpreter's: never an input a caller must give.
    dunders = {"name": "d", "nodes": [code_node("d", "result = [len(__builtins__), __file__, __spec__, _x_, __a]")]}
    assert compile_plan(workflow(dunders), registry).inputs_schema["required"] == ["__a", "_x_"]


def test_config_references_are_required_inputs_unless_something_else_gives_them(registry: NodeRegistry) -> None:
    headers = {
        "Authorization": "Bearer ${api_token}",
        "X-Order": "${order.id}",
        # The execution's own variables, secrets and escapes need no input.
        "X-Own": "${tenant_id} ${session_id} ${execution_id} ${workflow_id} ${session.tenant_id} ${session.id}",
        "X-Key": "${secret:PARTNER_KEY}",
        "X-Literal": "$${not_an_input}",
        # A reference the execution's variables do not resolve comes from the inputs.
        "X-User": "${session.user_id}",
        # Given by a connection, or by the node's own config.
        "X-Count": "${count} ${method}",
    }
    data = {
        "name": "hdr",
        "nodes": [
            code_node("first", "result = 1"),
            {
                "type": "HTTPRequestNode",
                "id": "h",
                "config": {"url": "http://127.0.0.1:9/data", "method": "GET", "headers": headers},
            },
        ],
        "connections": [{"from_node": "first", "from_output": "result", "to_node": "h", "to_input": "count"}],
    }
    plan = compile_plan(workflow(data), registry)
    assert plan.inputs_schema["required"] == ["api_token", "order", "session"]
    assert plan.missing_inputs({"order": {"id": 1}, "session": {}}) == ["api_token"]
    # As other required inputs: at the top level or under the id of the node that reads it.
    assert plan.missing_inputs({"h": {"api_token": "t", "order": {}, "session": {}}}) == []
    # The workflow: its one reference is a required input, listed and checked before a run.
    hdr_only = {
        "name": "hdr_only",
        "nodes": [
            {
                "type": "HTTPRequestNode",
                "id": "h",
                "config": {"url": "http://127.0.0.1:9/data", "headers": {"Authorization": "Bearer ${api_token}"}},
            }
        ],
    }
    assert compile_plan(workflow(hdr_only), registry).inputs_schema["required"] == ["api_token"]


def test_code_reads_the_executions_own_variables_which_are_never_inputs(registry: NodeRegistry) -> None:
    code = "result = {'t': tenant_id, 's': session_id, 'e': execution_id, 'w': workflow_id, 'n': n}"
    data = {"name": "own", "nodes": [code_node("c", code, config={"code": code, "greeting": "hi ${who}"})]}
    plan = compile_plan(workflow(data), registry)
    # A code node's config strings are not substituted: `${who}` needs nothing.
    assert plan.inputs_schema["required"] == ["n"]
    assert plan.missing_inputs({"n": 1}) == []


# -- Bounded cost: whatever a request holds, validation does bounded work and answers briefly.


def _with_empty_connections(count: int) -> workflow_pb2.Workflow:
    """One valid node and `count` empty connections (2 bytes each on the wire), parsed from bytes."""
    head = workflow_pb2.Workflow(name="w")
    head.nodes.add(type="PythonCodeNode", name="a").config.update({"code": "result = 1"})
    return workflow_pb2.Workflow.FromString(head.SerializeToString() + b"\x2a\x00" * count)


def test_too_many_connections_is_one_violation_checked_first(registry: NodeRegistry) -> None:
    problems = validate(_with_empty_connections(MAX_CONNECTIONS + 1), registry)
    assert problems == [("connections", f"at most {MAX_CONNECTIONS} connections, got {MAX_CONNECTIONS + 1}")]


def test_problems_past_the_cap_are_counted_in_a_last_note(registry: NodeRegistry) -> None:
    count = 4000  # under the connection cap; four problems each
    problems = validate(_with_empty_connections(count), registry)
    assert len(problems) == MAX_PROBLEMS + 1 and problems.total == 4 * count
    assert problems[0] == ("connections[0].from_node", "required")
    assert problems[-1] == ("workflow", f"and {4 * count - MAX_PROBLEMS} more problems not listed")


def test_configs_are_not_checked_once_the_list_is_full(registry: NodeRegistry) -> None:
    unnamed = {"type": "PythonCodeNode", "config": {"code": "result = 1"}}  # one problem each
    wf = workflow({"name": "w", "nodes": [unnamed] * MAX_PROBLEMS + [code_node("b", "x = ("), code_node("c")]})
    problems = validate(wf, registry)
    assert problems[-1] == ("workflow", "and the configs of 2 more nodes not checked")
    assert all(path.endswith(".name") for path, _ in problems[:-1]) and problems.total == MAX_PROBLEMS


def test_a_config_with_a_million_wrong_values_costs_a_hundred_problems(registry: NodeRegistry) -> None:
    config = {"url": "https://x.test", "headers": {f"h{i}": i for i in range(200_000)}}
    found = HTTPRequestNode.validate_config(config, "c")
    assert len(found) == MAX_CONFIG_PROBLEMS and all(path.startswith("c.headers.") for path, _ in found)


def test_an_oversized_config_is_one_problem(registry: NodeRegistry) -> None:
    wf = workflow({"name": "w", "nodes": [code_node("a")]})
    wf.nodes[0].config.update({"code": "result = 1", "blob": "x" * MAX_CONFIG_BYTES})
    assert validate(wf, registry) == [
        ("nodes[0].config", f"at most {MAX_CONFIG_BYTES} bytes serialized, got {wf.nodes[0].config.ByteSize()}")
    ]


def test_the_configs_together_are_capped_first(registry: NodeRegistry) -> None:
    blob = "x" * (MAX_CONFIG_BYTES // 2)
    wf = workflow({"name": "w", "nodes": [code_node(f"n{i}") for i in range(10)]})
    for node in wf.nodes:
        node.config.update({"blob": blob})
    total = sum(node.config.ByteSize() for node in wf.nodes)
    assert total > MAX_CONFIGS_BYTES
    assert validate(wf, registry) == [
        ("nodes", f"the nodes' configs take at most {MAX_CONFIGS_BYTES} bytes together, got {total}")
    ]


def test_a_long_output_path_is_refused_before_it_is_split(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), code_node("b")],
        "connections": [{"from_node": "a", "from_output": "r." * 500_000, "to_node": "b", "to_input": "x"}],
    }
    assert paths(data, registry) == {"connections[0].from_output": f"at most {MAX_PATH_CHARS} characters"}


def test_an_index_of_five_thousand_digits_is_not_an_internal_error(registry: NodeRegistry) -> None:
    data = {
        "name": "w",
        "nodes": [code_node("a"), code_node("b")],
        "connections": [{"from_node": "a", "from_output": f"result[{'9' * 1000}]", "to_node": "b", "to_input": "x"}],
    }
    assert paths(data, registry) == {}  # the path's first step names the output; the index is looked up at run time


async def test_a_flood_of_empty_connections_gets_a_short_answer_from_the_server(tmp_path: Path) -> None:
    from flowport.clients import ApiError, AsyncClient
    from flowport.server.app import start, stop

    from ..conftest import ADMIN_KEY, make_settings

    server = await start(make_settings(tmp_path / "data", sandbox_workers=1))
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}", api_key=ADMIN_KEY) as client:
            # Under the cap: every problem counted, a hundred listed.
            answer = await client.workflows.ValidateWorkflow(
                workflow_pb2.ValidateWorkflowRequest(workflow=_with_empty_connections(4000))
            )
            assert not answer.valid and len(answer.errors) == MAX_PROBLEMS + 1
            assert answer.errors[-1].description == f"and {16_000 - MAX_PROBLEMS} more problems not listed"
            # Past it: one violation, whatever the count.
            flood = _with_empty_connections(200_000)
            answer = await client.workflows.ValidateWorkflow(workflow_pb2.ValidateWorkflowRequest(workflow=flood))
            assert [(e.field, e.description) for e in answer.errors] == [
                ("connections", f"at most {MAX_CONNECTIONS} connections, got 200000")
            ]
            with pytest.raises(ApiError) as caught:
                await client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=flood))
            assert caught.value.reason == "INVALID_WORKFLOW" and caught.value.violations == [
                ("connections", f"at most {MAX_CONNECTIONS} connections, got 200000")
            ]
            with pytest.raises(ApiError) as caught:
                await client.workflows.CreateWorkflow(
                    workflow_pb2.CreateWorkflowRequest(workflow=_with_empty_connections(4000))
                )
            assert caught.value.message.startswith("workflow is not valid (16000 problems): ")
    finally:
        await stop(server, 1.0)
