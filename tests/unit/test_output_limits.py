"""What nodes add to an execution's outputs is bounded in depth and size, and one execution row that
cannot be read (written before these bounds, or by any other path) stops no takeover and no restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from flowport.server.engine.executor import Executor
from flowport.server.engine.output_limits import MAX_DEPTH, MAX_EXECUTION_BYTES, MAX_NODE_BYTES, add_outputs
from flowport.server.engine.plan import PlanCache
from flowport.server.engine.registry import NodeRegistry
from flowport.server.events.bus import EventBus
from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError, NodeServices, NodeType
from flowport.server.storage import SqliteStore
from flowport.v1 import execution_pb2

from .test_executor import AddNode, inputs, wf

Execution = execution_pb2.Execution
pytestmark = pytest.mark.timeout(60)


def _nested(depth: int) -> Any:
    """`depth` levels of objects and lists, alike."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"d": value} if level % 2 else [value]
    return value


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


class EchoNode(NodeType):
    """Returns `depth` levels of nesting, or `size` bytes of text."""

    type_name = "EchoNode"
    description = "echoes"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {"depth": {"type": "integer"}, "size": {"type": "integer"}},
    }
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {}}}
    retry_safe = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("depth"):
            return {"result": _nested(params["depth"])}
        return {"result": "x" * params.get("size", 1)}


def test_outputs_are_bounded_in_depth_and_size() -> None:
    outputs = struct_pb2.Struct()
    deepest = {"result": _nested(MAX_DEPTH - 1)}
    assert _depth(deepest) == MAX_DEPTH
    used = add_outputs(outputs, "a", deepest, 0)
    assert used == outputs.ByteSize()
    with pytest.raises(NodeError) as deep:
        add_outputs(outputs, "b", {"result": _nested(MAX_DEPTH)}, used)
    assert deep.value.reason == "OUTPUT_TOO_DEEP" and not deep.value.retryable
    with pytest.raises(NodeError) as large:
        add_outputs(outputs, "b", {"result": "x" * MAX_NODE_BYTES}, used)
    assert large.value.reason == "OUTPUT_TOO_LARGE"
    half = {"result": "x" * (MAX_NODE_BYTES - 100)}
    used = add_outputs(outputs, "b", half, used)
    with pytest.raises(NodeError) as total:
        add_outputs(outputs, "c", half, used)
    assert total.value.reason == "EXECUTION_OUTPUT_TOO_LARGE" and used + len(half["result"]) > MAX_EXECUTION_BYTES
    assert set(outputs.fields) == {"a", "b"}, "a refused output adds nothing"
    with pytest.raises(ValueError, match="Unexpected type"):  # not JSON: the walk's BAD_OUTPUT
        add_outputs(outputs, "c", {"result": object()}, used)


async def test_a_node_returning_outputs_too_deep_fails_and_its_execution_stays_readable(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    executor = Executor(store, PlanCache(NodeRegistry([EchoNode])), EventBus(), NodeServices(), max_concurrent=2)
    try:
        # 40 levels: written whole, such a row could no longer be parsed (protobuf's 100 messages).
        deep = wf("deep", [{"type": "EchoNode", "name": "e", "config": {"depth": 40}}])
        started, _ = await executor.create("t", deep, inputs(), session_id="", request_id="", request_hash=None)
        done = await executor.wait("t", started.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_FAILED
        assert "nest deeper than 20" in done.error.message, done.error.message
        stored = await store.get_execution("t", started.execution_id)
        assert stored is not None and stored.state == Execution.STATE_FAILED
    finally:
        await executor.shutdown()
        await store.close()


async def test_an_executions_inputs_count_toward_its_bound(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    executor = Executor(store, PlanCache(NodeRegistry([EchoNode])), EventBus(), NodeServices(), max_concurrent=2)
    try:
        six = wf("six", [{"type": "EchoNode", "name": "e", "config": {"size": 6 * 2**20}}])
        values = struct_pb2.Struct()
        values.update({"big": "x" * (7 * 2**20)})  # 7 MiB of inputs and 6 MiB of outputs: past 12 MiB
        started, _ = await executor.create("t", six, values, session_id="", request_id="", request_hash=None)
        done = await executor.wait("t", started.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_FAILED
        assert "more than 12582912" in done.error.message, done.error.message
        alone, _ = await executor.create("t", six, inputs(), session_id="", request_id="", request_hash=None)
        done = await executor.wait("t", alone.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_SUCCEEDED  # the same outputs fit alone
    finally:
        await executor.shutdown()
        await store.close()


async def test_an_unreadable_execution_is_set_aside_and_the_others_are_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await SqliteStore.open(path)
    chain = wf("chain", [{"type": "AddNode", "name": "a", "config": {"add": 1}}])
    await store.create_workflow("t", chain, None)
    # What a crashed process left: one execution to resume, and one whose body no parser reads.
    poison = Execution(execution_id="exe_poison", workflow_id="chain", workflow_version=1, tenant="t")
    poison.state = Execution.STATE_RUNNING
    poison.outputs.update({"a": {"result": _nested(40)}})
    with pytest.raises(DecodeError):
        Execution.FromString(poison.SerializeToString())
    resumable = Execution(execution_id="exe_ok", workflow_id="chain", workflow_version=1, tenant="t")
    resumable.state = Execution.STATE_RUNNING
    resumable.inputs.update({"x": 1})
    for execution in (poison, resumable):
        execution.create_time.GetCurrentTime()
        await store.insert_execution("t", execution, None)
    executor = Executor(store, PlanCache(NodeRegistry([AddNode])), EventBus(), NodeServices(), max_concurrent=4)
    try:
        assert await executor.recover() == (1, 0)  # it does not raise: the restart goes on
        done = await executor.wait("t", "exe_ok", 10)
        assert done is not None and done.state == Execution.STATE_SUCCEEDED
        # Set aside as failed: never claimed again, by this process or another.
        with sqlite3.connect(path) as raw:
            [(state,)] = raw.execute("SELECT state FROM executions WHERE execution_id='exe_poison'").fetchall()
        assert state == Execution.STATE_FAILED
        assert await executor.recover(expired_only=False) == (0, 0)
        # And readable again: every reader gets a failed execution that says why.
        set_aside = await store.get_execution("t", "exe_poison")
        assert set_aside is not None and set_aside.state == Execution.STATE_FAILED
        assert set_aside.workflow_id == "chain" and "could not be read" in set_aside.error.message
        listed = await store.list_executions("t", workflow_id="", session_id="", state=0, after=None, limit=10)
        assert {e.execution_id for e in listed} == {"exe_ok", "exe_poison"}
    finally:
        await executor.shutdown()
        await store.close()
