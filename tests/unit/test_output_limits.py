"""What nodes add to an execution's outputs is bounded in depth and size, and one execution row that
cannot be read (written before these bounds, or by any other path) stops no takeover and no restart."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2

from flowport.server.engine import values
from flowport.server.engine.executor import Executor
from flowport.server.engine.output_limits import (
    MAX_DEPTH,
    MAX_EXECUTION_BYTES,
    MAX_NODE_BYTES,
    add_outputs,
    built_outputs,
)
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


def _empty_nested(depth: int) -> list[Any]:
    """`depth` levels of lists, the innermost empty."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
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


async def _add(outputs: struct_pb2.Struct, node_id: str, value: dict[str, Any], used: int) -> int:
    return add_outputs(outputs, await built_outputs(node_id, value), used)


async def test_outputs_are_bounded_in_depth_and_size() -> None:
    outputs = struct_pb2.Struct()
    deepest = {"result": _nested(MAX_DEPTH - 1)}
    assert _depth(deepest) == MAX_DEPTH
    used = await _add(outputs, "a", deepest, 0)
    assert used == outputs.ByteSize()
    with pytest.raises(NodeError) as deep:
        await _add(outputs, "b", {"result": _nested(MAX_DEPTH)}, used)
    assert deep.value.reason == "OUTPUT_TOO_DEEP" and not deep.value.retryable
    # An empty list or object is a level too.
    with pytest.raises(NodeError, match="nest deeper"):
        await _add(outputs, "b", {"result": _empty_nested(MAX_DEPTH)}, used)
    with pytest.raises(NodeError) as large:
        await _add(outputs, "b", {"result": "x" * MAX_NODE_BYTES}, used)
    assert large.value.reason == "OUTPUT_TOO_LARGE"
    half = {"result": "x" * (MAX_NODE_BYTES - 100)}
    used = await _add(outputs, "b", half, used)
    with pytest.raises(NodeError) as total:
        await _add(outputs, "c", half, used)
    assert total.value.reason == "EXECUTION_OUTPUT_TOO_LARGE" and used + len(half["result"]) > MAX_EXECUTION_BYTES
    assert set(outputs.fields) == {"a", "b"}, "a refused output adds nothing"
    with pytest.raises(ValueError, match="Unexpected type object"):  # not JSON: the walk's BAD_OUTPUT
        await _add(outputs, "c", {"result": object()}, used)
    with pytest.raises(ValueError, match="too large for a JSON number"):
        await _add(outputs, "c", {"result": 10**400}, used)
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(NodeError, match="nest deeper"):
        await _add(outputs, "c", {"result": cycle}, used)
    assert set(outputs.fields) == {"a", "b"}


@pytest.mark.timeout(30)
async def test_outputs_holding_one_value_many_times_are_refused_before_their_struct_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value held many times by reference (a TransformNode mapping many keys to one list or one
    string) is small in memory and gigabytes as a Struct: its build stops as soon as the bytes built
    pass a node's bound, long before the Struct is whole."""
    copied: list[int] = []
    set_value = values._Builder._set

    def counted(self: Any, value: Any, item: Any, depth: int) -> int:
        if isinstance(item, str):
            copied.append(len(item))
        return set_value(self, value, item, depth)

    monkeypatch.setattr(values._Builder, "_set", counted)
    # One 1 MiB string under 4,000 keys (4 GiB as a Struct): its eighth copy, with the keys, passes 8 MiB.
    text = "x" * 2**20
    with pytest.raises(NodeError) as large:
        await built_outputs("t", {f"k{n}": text for n in range(4000)})
    assert large.value.reason == "OUTPUT_TOO_LARGE" and not large.value.retryable
    assert len(copied) == MAX_NODE_BYTES // 2**20, len(copied)
    copied.clear()
    shared = ["x" * 4096] * 64
    with pytest.raises(NodeError, match="more than a node's"):
        await built_outputs("t", {f"k{n}": shared for n in range(3000)})  # ~786 MB written out
    assert len(copied) <= MAX_NODE_BYTES // 4096 + 1, len(copied)
    # A list of 200,000 numbers held 2,000 times (minutes and gigabytes as a whole Struct): 11
    # bytes a number or more, so stopped within its fourth copy.
    turns: list[int] = []
    turn = values._Builder.turn

    def counted_turn(self: Any, budget: int) -> bool:
        turns.append(budget)
        return turn(self, budget)

    monkeypatch.setattr(values._Builder, "turn", counted_turn)
    numbers = list(range(200_000))
    with pytest.raises(NodeError) as large:
        await built_outputs("t", {f"k{n}": numbers for n in range(2000)})
    assert large.value.reason == "OUTPUT_TOO_LARGE"
    assert len(turns) <= 4 * 200_000 // values.VALUES_PER_TURN + 2, len(turns)


class ManyNode(NodeType):
    """Returns `count` strings of 60 characters: outputs built in many turns."""

    type_name = "ManyNode"
    description = "many strings"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"count": {"type": "integer"}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {}}}
    retry_safe = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"result": [f"{ctx.node_id}-{n:056d}" for n in range(params["count"])]}


async def test_parallel_nodes_building_outputs_at_once_count_each_others_bytes(tmp_path: Path) -> None:
    """Four parallel nodes of about 6.4 MB of outputs each, built in turns at the same time: each
    counts what the others added, so the execution stays within its bound, and the tenant's count
    of held bytes comes back to nothing once it ends."""
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    executor = Executor(
        store,
        PlanCache(NodeRegistry([ManyNode])),
        EventBus(),
        NodeServices(),
        max_concurrent=8,
        tenant_max_output_bytes=256 * 2**20,
    )
    nodes = [{"type": "ManyNode", "name": f"m{i}", "config": {"count": 100_000}} for i in range(4)]
    try:
        started, _ = await executor.create(
            "t", wf("wide", nodes), inputs(), session_id="", request_id="", request_hash=None
        )
        done = await executor.wait("t", started.execution_id, 60)
        assert done is not None and done.state == Execution.STATE_FAILED
        assert _failure_reason(done) == "EXECUTION_OUTPUT_TOO_LARGE", done.error.message
        assert done.outputs.ByteSize() <= MAX_EXECUTION_BYTES and len(done.outputs.fields) == 1
        assert executor._slots.output_bytes("t") == 0
    finally:
        await executor.shutdown()
        await store.close()


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


class HoldNode(NodeType):
    """Waits until HELD is set: its execution keeps its earlier nodes' outputs meanwhile."""

    type_name = "HoldNode"
    description = "holds"
    category = "test"
    inputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"x": {}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {}}
    retry_safe = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        await HELD.wait()
        return {}


HELD = asyncio.Event()


def _failure_reason(execution: Execution) -> str:
    for detail in execution.error.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def test_a_tenants_running_executions_hold_at_most_its_bytes_of_outputs_and_others_keep_theirs(
    tmp_path: Path,
) -> None:
    """Outputs stay in memory until their execution ends: one tenant's many runs of large outputs
    get TENANT_OUTPUT_MEMORY past its cap, another tenant's runs go on, and an ended run gives its
    bytes back."""
    HELD.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    registry = NodeRegistry([EchoNode, HoldNode])
    executor = Executor(
        store, PlanCache(registry), EventBus(), NodeServices(), max_concurrent=8, tenant_max_output_bytes=2_500_000
    )
    held = wf(
        "held",
        [{"type": "EchoNode", "name": "e", "config": {"size": 1_000_000}}, {"type": "HoldNode", "name": "h"}],
        [("e", "result", "h", "x")],
    )
    alone = wf("alone", [{"type": "EchoNode", "name": "e", "config": {"size": 1_000_000}}])
    try:
        runs = [
            (await executor.create("t", held, inputs(), session_id="", request_id="", request_hash=None))[0]
            for _ in range(3)
        ]
        async with asyncio.timeout(10):
            while True:
                states = [(await executor.get("t", r.execution_id)) for r in runs]
                failed = [e for e in states if e is not None and e.state == Execution.STATE_FAILED]
                holding = [e for e in states if e is not None and "e" in e.outputs.fields]
                if len(failed) + len(holding) == 3:
                    break
                await asyncio.sleep(0.01)
        assert len(failed) == 1 and len(holding) == 2
        assert _failure_reason(failed[0]) == "TENANT_OUTPUT_MEMORY", failed[0].error.message
        assert "2500000 bytes" in failed[0].error.message
        assert 2_000_000 < executor._slots.output_bytes("t") <= 2_500_000

        other, _ = await executor.create("u", alone, inputs(), session_id="", request_id="", request_hash=None)
        done = await executor.wait("u", other.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_SUCCEEDED, "another tenant's bytes are its own"

        HELD.set()
        for execution in holding:
            done = await executor.wait("t", execution.execution_id, 10)
            assert done is not None and done.state == Execution.STATE_SUCCEEDED
        assert executor._slots.output_bytes("t") == 0 == executor._slots.output_bytes("u"), "ended runs give back"
        again, _ = await executor.create("t", alone, inputs(), session_id="", request_id="", request_hash=None)
        done = await executor.wait("t", again.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_SUCCEEDED
    finally:
        HELD.set()
        await executor.shutdown()
        await store.close()


async def test_a_tenants_large_inputs_are_read_one_call_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs too large for one turn are read a call at a time per tenant (each call's values are
    held as they are made, before any tenant check); another tenant's are read meanwhile."""
    from flowport.server.engine import executor as executor_module

    reading: dict[str, int] = {}
    most: dict[str, int] = {}
    read = executor_module.read_in_turns

    async def counted(struct: struct_pb2.Struct) -> dict[str, Any]:
        tenant = struct.fields["tenant"].string_value
        reading[tenant] = reading.get(tenant, 0) + 1
        most[tenant] = max(most.get(tenant, 0), reading[tenant])
        most["both"] = max(most.get("both", 0), sum(reading.values()))
        try:
            return await read(struct)
        finally:
            reading[tenant] -= 1

    monkeypatch.setattr(executor_module, "read_in_turns", counted)
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    executor = Executor(store, PlanCache(NodeRegistry([EchoNode])), EventBus(), NodeServices(), max_concurrent=8)
    echo = wf("echo", [{"type": "EchoNode", "name": "e", "config": {"size": 1}}])
    try:

        async def create(tenant: str) -> None:
            await executor.create(
                tenant, echo, inputs(tenant=tenant, rows=[[]] * 50_000), session_id="", request_id="", request_hash=None
            )

        await asyncio.gather(*(create(tenant) for tenant in ("t", "t", "t", "u", "u")))
        # One read at a time per tenant, and the two tenants' reads at the same time.
        assert most == {"t": 1, "u": 1, "both": 2}
        assert executor._large_inputs.held("t") == 0 == executor._large_inputs.held("u")
    finally:
        await executor.shutdown()
        await store.close()
