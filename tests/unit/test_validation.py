"""Workflow validation: one test per rejection rule, each checking the field path."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import duration_pb2, json_format

from flowport.server.engine.plan import InvalidWorkflow, compile_plan
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.validation import validate
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
    problems = paths({"name": "no spaces please", "nodes": []}, registry)
    assert "letters, digits" in problems["name"]
    assert problems["nodes"] == "at least one node is required"


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
