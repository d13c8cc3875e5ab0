"""The executor on a real SQLite store, with small node types of the tests'
own (plugged in as any custom node type would be)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from flowport.server.engine import walk
from flowport.server.engine.executor import Executor
from flowport.server.engine.plan import InvalidWorkflow, PlanCache, compile_plan
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.work_queue import QueueUnavailable, WorkQueue
from flowport.server.errors import InvalidArgument, ResourceExhausted
from flowport.server.events.bus import EventBus
from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError, NodeServices, NodeType
from flowport.server.nodes.builtins import MergeNode, SwitchNode
from flowport.server.nodes.permission_check import PermissionCheckNode
from flowport.server.nodes.python_code import PythonCodeNode
from flowport.server.nodes.substitution import substitute
from flowport.server.storage import IdempotencyConflict, SqliteStore
from flowport.server.storage.group_commit import StoreUnavailable
from flowport.v1 import execution_pb2, workflow_pb2

Execution = execution_pb2.Execution
NodeRun = execution_pb2.NodeRun
CALLS: dict[str, int] = {}
GATES: dict[str, asyncio.Event] = {}


class AddNode(NodeType):
    """result = x + add (x from an input, add from config)."""

    type_name = "AddNode"
    description = "adds"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"add": {"type": "number"}}}
    inputs_schema: ClassVar[JsonSchema] = {"type": "object", "required": ["x"], "properties": {"x": {}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {}}}
    retry_safe = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        CALLS[ctx.node_id] = CALLS.get(ctx.node_id, 0) + 1
        return {"result": params["x"] + params.get("add", 0)}


class GateNode(NodeType):
    """Waits for the gate named in config, then returns; not retry-safe."""

    type_name = "GateNode"
    description = "waits"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {"gate": {"type": "string"}, "open": {"type": "string"}},
    }
    inputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"x": {}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {}}}

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        CALLS[ctx.node_id] = CALLS.get(ctx.node_id, 0) + 1
        if params.get("open"):
            GATES.setdefault(params["open"], asyncio.Event()).set()
        if params.get("gate"):
            await GATES.setdefault(params["gate"], asyncio.Event()).wait()
        return {"result": ctx.node_id}


class SafeGateNode(GateNode):
    """A GateNode that is safe to run twice."""

    type_name = "SafeGateNode"
    retry_safe = True


class FlakyNode(NodeType):
    """Fails (retryably) until its `failures` budget is spent."""

    type_name = "FlakyNode"
    description = "flaky"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"failures": {"type": "integer"}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {}}}
    retry_safe = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        if ctx.attempt <= params.get("failures", 0):
            raise NodeError(f"attempt {ctx.attempt} failed", reason="FLAKY", retryable=True)
        return {"result": ctx.attempt}


class SayNode(NodeType):
    """result = `text` with its `${name}` references substituted, as HTTP nodes do theirs."""

    type_name = "SayNode"
    description = "says"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"text": {"type": "string"}}}
    inputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"who": {}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {}}}
    retry_safe = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"result": substitute(params.get("text"), params)}


class EchoSandbox:
    """A sandbox pool that runs no code: `result` is the variables the code was given, and its tenant."""

    async def run(self, code: str, inputs: dict[str, Any], *, tenant: str, timeout: float | None = None) -> Any:
        return {"tenant": tenant, "variables": inputs}


class RolesNode(NodeType):
    """result: the roles in its config, as a session's metadata might give them."""

    type_name = "RolesNode"
    description = "gives roles"
    category = "test"
    config_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"roles": {"type": "array"}}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {"type": "array"}}}

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"result": params["roles"]}


REGISTRY = NodeRegistry(
    [
        *(AddNode, GateNode, SafeGateNode, FlakyNode, SwitchNode, MergeNode, SayNode, PythonCodeNode),
        *(PermissionCheckNode, RolesNode),
    ]
)


def wf(
    name: str, nodes: list[dict[str, Any]], connections: list[tuple[str, str, str, str]] = (), version: int = 1
) -> workflow_pb2.Workflow:  # type: ignore[assignment]
    message = json_format.ParseDict(
        {
            "name": name,
            "nodes": nodes,
            "connections": [
                {"from_node": a, "from_output": o, "to_node": b, "to_input": i} for a, o, b, i in connections
            ],
        },
        workflow_pb2.Workflow(),
    )
    message.workflow_id = name
    message.version = version
    message.tenant = "t"
    return message


def inputs(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Executor, SqliteStore, EventBus]]:
    CALLS.clear()
    GATES.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    bus = EventBus()
    executor = Executor(store, PlanCache(REGISTRY), bus, NodeServices(), max_concurrent=4)
    yield executor, store, bus
    await executor.shutdown()
    await store.close()


async def run(executor: Executor, workflow: workflow_pb2.Workflow, **values: Any) -> Execution:
    execution, _ = await executor.create(
        "t", workflow, inputs(**values), session_id="", request_id="", request_hash=None
    )
    done = await executor.wait("t", execution.execution_id, 10)
    assert done is not None
    return done


async def test_a_chain_passes_outputs_along_and_config_becomes_parameters(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    executor, store, _ = env
    chain = wf(
        "chain",
        [
            {"type": "AddNode", "name": "a", "config": {"add": 1}},
            {"type": "AddNode", "name": "b", "config": {"add": 10}},
        ],
        [("a", "result", "b", "x")],
    )
    done = await run(executor, chain, x=5)
    assert done.state == Execution.STATE_SUCCEEDED
    assert json_format.MessageToDict(done.outputs) == {"a": {"result": 6.0}, "b": {"result": 16.0}}
    assert [(r.node_id, r.state, r.attempts) for r in done.node_runs] == [
        ("a", NodeRun.STATE_SUCCEEDED, 1),
        ("b", NodeRun.STATE_SUCCEEDED, 1),
    ]
    stored = await store.get_execution("t", done.execution_id)
    assert stored == done, "the final state is durable"


async def test_integers_reach_nodes_as_integers(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    seen: list[Any] = []

    class Probe(AddNode):
        type_name = "Probe"

        async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
            seen.append(params["x"])
            return {"result": 0}

    _executor, store, bus = env
    probe = Executor(store, PlanCache(NodeRegistry([Probe])), bus, NodeServices(), max_concurrent=1)
    await run(probe, wf("probe", [{"type": "Probe", "name": "p"}]), x=3)
    assert seen == [3] and isinstance(seen[0], int)


async def test_independent_branches_run_concurrently(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, _ = env
    # Each branch opens the gate the other waits on: only concurrent runs finish.
    both = wf(
        "both",
        [
            {"type": "GateNode", "name": "left", "config": {"open": "L", "gate": "R"}, "timeout": "5s"},
            {"type": "GateNode", "name": "right", "config": {"open": "R", "gate": "L"}, "timeout": "5s"},
        ],
    )
    done = await run(executor, both)
    assert done.state == Execution.STATE_SUCCEEDED, done.error.message


async def test_the_concurrency_limit_answers_resource_exhausted(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, _ = env
    waiting = wf("waiting", [{"type": "GateNode", "name": "g", "config": {"gate": "never"}}])
    started = [
        await executor.create("t", waiting, inputs(), session_id="", request_id="", request_hash=None) for _ in range(4)
    ]
    with pytest.raises(ResourceExhausted) as caught:
        await executor.create("t", waiting, inputs(), session_id="", request_id="", request_hash=None)
    assert caught.value.retry_delay is not None
    for execution, _ in started:
        await executor.cancel("t", execution.execution_id)
    assert executor.running == 0


async def test_a_retry_is_answered_even_when_the_server_is_full(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, _ = env
    waiting = wf("waiting", [{"type": "GateNode", "name": "g", "config": {"gate": "never"}}])
    first, replayed = await executor.create(
        "t", waiting, inputs(), session_id="", request_id="retry-me", request_hash=b"h1"
    )
    assert not replayed
    started = [
        await executor.create("t", waiting, inputs(), session_id="", request_id="", request_hash=None) for _ in range(3)
    ]
    again, replayed = await executor.create(
        "t", waiting, inputs(), session_id="", request_id="retry-me", request_hash=b"h1"
    )
    assert replayed and again.execution_id == first.execution_id
    with pytest.raises(IdempotencyConflict):  # the key with another body: still a conflict, not "full"
        await executor.create("t", waiting, inputs(), session_id="", request_id="retry-me", request_hash=b"h2")
    with pytest.raises(ResourceExhausted):  # another tenant's key of that name is not a replay
        await executor.create("u", waiting, inputs(), session_id="", request_id="retry-me", request_hash=b"h1")
    for execution, _ in [(first, False), *started]:
        await executor.cancel("t", execution.execution_id)
    assert executor.running == 0


async def test_a_tenant_at_its_share_is_refused_while_other_tenants_still_start(tmp_path: Path) -> None:
    GATES.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    executor = Executor(store, PlanCache(REGISTRY), EventBus(), NodeServices(), max_concurrent=4, tenant_share=2)
    waiting = wf("waiting", [{"type": "GateNode", "name": "g", "config": {"gate": "never"}}])
    started: list[tuple[str, Execution]] = []

    async def create(tenant: str, request_id: str = "") -> Execution:
        hash_ = b"h" if request_id else None
        execution, _ = await executor.create(
            tenant, waiting, inputs(), session_id="", request_id=request_id, request_hash=hash_
        )
        started.append((tenant, execution))
        return execution

    try:
        first = await create("t", "first")
        await create("t")
        with pytest.raises(ResourceExhausted) as caught:
            await create("t")
        assert caught.value.reason == "TENANT_EXECUTION_SHARE" and caught.value.retry_delay is not None
        assert caught.value.metadata == {"tenant_max_concurrent_executions": "2", "max_concurrent_executions": "4"}
        # A retry of a call that started one is still answered at the share.
        assert (await create("t", "first")).execution_id == first.execution_id
        for _ in range(2):  # the other half of the slots is there for everyone else
            await create("u")
        with pytest.raises(ResourceExhausted) as full:
            await create("v")
        assert full.value.reason == "TOO_MANY_EXECUTIONS", "the server-wide limit still holds"
        assert (executor.tenant_running("t"), executor.tenant_running("u"), executor.running) == (2, 2, 4)
        await executor.cancel("t", first.execution_id)
        assert executor.tenant_running("t") == 1
        await create("t")  # its slot is back
    finally:
        for tenant, execution in started:
            await executor.cancel(tenant, execution.execution_id)
        assert executor.running == 0 and executor.tenant_running("t") == 0
        await executor.shutdown()
        await store.close()


async def test_a_node_timeout_fails_the_execution_naming_the_node(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, _ = env
    slow = wf("slow", [{"type": "GateNode", "name": "stuck", "config": {"gate": "never"}, "timeout": "0.2s"}])
    done = await run(executor, slow)
    assert done.state == Execution.STATE_FAILED
    assert "stuck" in done.error.message and "timed out" in done.error.message
    assert done.node_runs[0].state == NodeRun.STATE_FAILED


async def test_retry_safe_nodes_are_retried_with_backoff(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, _ = env
    flaky = wf("flaky", [{"type": "FlakyNode", "name": "f", "config": {"failures": 2}}])
    flaky.nodes[0].retry.max_attempts = 3
    flaky.nodes[0].retry.initial_backoff.CopyFrom(duration_pb2.Duration(nanos=10_000_000))
    done = await run(executor, flaky)
    assert done.state == Execution.STATE_SUCCEEDED
    assert done.node_runs[0].attempts == 3
    flaky.name = flaky.workflow_id = "flaky2"
    flaky.nodes[0].retry.max_attempts = 2
    failed = await run(executor, flaky)
    assert failed.state == Execution.STATE_FAILED and failed.node_runs[0].attempts == 2


async def test_a_switch_skips_the_branch_not_taken_and_merge_runs_with_what_arrived(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    executor, _, _ = env
    routed = wf(
        "routed",
        [
            {"type": "SwitchNode", "name": "sw", "config": {"condition_field": "n", "operator": ">", "value": 10}},
            {"type": "AddNode", "name": "big", "config": {"add": 0}},
            {"type": "AddNode", "name": "small", "config": {"add": 0}},
            {"type": "MergeNode", "name": "m"},
        ],
        [
            ("sw", "true_output.n", "big", "x"),
            ("sw", "false_output.n", "small", "x"),
            ("big", "result", "m", "data1"),
            ("small", "result", "m", "data2"),
        ],
    )
    done = await run(executor, routed, input_data={"n": 3})
    assert done.state == Execution.STATE_SUCCEEDED, done.error.message
    states = {r.node_id: r.state for r in done.node_runs}
    assert states["big"] == NodeRun.STATE_SKIPPED and states["small"] == NodeRun.STATE_SUCCEEDED
    assert json_format.MessageToDict(done.outputs)["m"]["merged_data"] == [3.0]


async def test_a_connection_reads_an_alias_from_the_output_it_names_and_the_alias_is_not_stored(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    """MergeNode's `result` is `merged_data` read under another name (as HTTP nodes' `result` is
    `response`, SQL nodes' `rows` is `result.rows`): stored once, so it counts once."""
    executor, _, _ = env
    aliased = wf(
        "aliased",
        [
            {"type": "AddNode", "name": "a", "config": {"add": 1}},
            {"type": "MergeNode", "name": "m"},
            {"type": "AddNode", "name": "b", "config": {"add": 10}},
        ],
        [("a", "result", "m", "data1"), ("m", "result.0", "b", "x")],
    )
    done = await run(executor, aliased, x=5)
    assert done.state == Execution.STATE_SUCCEEDED, done.error.message
    outputs = json_format.MessageToDict(done.outputs)
    assert outputs["m"] == {"merged_data": [6.0]} and outputs["b"] == {"result": 16.0}
    typo = wf(
        "typo",
        [{"type": "MergeNode", "name": "m"}, {"type": "AddNode", "name": "b"}],
        [("m", "results", "b", "x")],
    )
    with pytest.raises(InvalidWorkflow, match="MergeNode has no output 'results'; it has: merged_data, result"):
        compile_plan(typo, REGISTRY)


async def test_missing_required_inputs_are_invalid_argument(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, _ = env
    with pytest.raises(InvalidArgument) as caught:
        await executor.create(
            "t",
            wf("needs_x", [{"type": "AddNode", "name": "a"}]),
            inputs(),
            session_id="",
            request_id="",
            request_hash=None,
        )
    assert caught.value.violations == [("inputs.x", "required by the workflow")]


async def test_a_config_reference_is_a_required_input_checked_before_the_run(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    executor, _, _ = env
    says = wf("says", [{"type": "SayNode", "name": "s", "config": {"text": "Bearer ${api_token} for ${tenant_id}"}}])
    with pytest.raises(InvalidArgument) as caught:
        await executor.create("t", says, inputs(), session_id="", request_id="", request_hash=None)
    assert caught.value.violations == [("inputs.api_token", "required by the workflow")]
    done = await run(executor, says, api_token="abc", tenant_id="evil")
    assert done.state == Execution.STATE_SUCCEEDED
    assert json_format.MessageToDict(done.outputs) == {"s": {"result": "Bearer abc for t"}}
    # A reference a connection gives is not asked of the caller.
    chained = wf(
        "says_chained",
        [
            {"type": "AddNode", "name": "a", "config": {"add": 1}},
            {"type": "SayNode", "name": "s", "config": {"text": "got ${who}"}},
        ],
        [("a", "result", "s", "who")],
    )
    done = await run(executor, chained, x=1)
    assert json_format.MessageToDict(done.outputs)["s"] == {"result": "got 2"}


async def test_a_callers_inputs_cannot_set_the_roles_a_permission_check_checks(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    """The workflow says whose roles a PermissionCheckNode checks (config or connection): a caller
    handing itself the admin role under the node's id is refused before the run."""
    executor, _, _ = env
    gate = wf("gate", [{"type": "PermissionCheckNode", "name": "check", "config": {"roles": ["user"]}}])
    forged = {"permission": "t:doc:admin", "roles": ["admin"], "enforce_tenant_scope": False}
    with pytest.raises(InvalidArgument) as caught:
        await executor.create("t", gate, inputs(check=forged), session_id="", request_id="", request_hash=None)
    assert caught.value.violations == [
        ("inputs.check.enforce_tenant_scope", "set by the workflow, not by execution inputs"),
        ("inputs.check.roles", "set by the workflow, not by execution inputs"),
    ]
    done = await run(executor, gate, check={"permission": "t:doc:admin"}, roles=["admin"])
    assert json_format.MessageToDict(done.outputs)["check"]["allowed"] is False, "a top-level input is not read"
    # A connection is the workflow's own: it does set them.
    connected = wf(
        "gate_connected",
        [
            {"type": "RolesNode", "name": "who", "config": {"roles": ["admin"]}},
            {"type": "PermissionCheckNode", "name": "check"},
        ],
        [("who", "result", "check", "roles")],
    )
    done = await run(executor, connected, permission="t:doc:admin")
    assert json_format.MessageToDict(done.outputs)["check"]["allowed"] is True


async def test_code_sees_the_executions_own_variables_whatever_inputs_and_connections_say(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    services = NodeServices(sandbox=cast(Any, EchoSandbox()))
    executor = Executor(store, PlanCache(REGISTRY), EventBus(), services, max_concurrent=4)
    code = "result = [tenant_id, session_id, execution_id, workflow_id, n]"
    try:
        alone = wf("own_vars", [{"type": "PythonCodeNode", "name": "c", "config": {"code": code}}])
        # Not required inputs: only `n` is.
        with pytest.raises(InvalidArgument) as caught:
            await executor.create("t", alone, inputs(), session_id="", request_id="", request_hash=None)
        assert caught.value.violations == [("inputs.n", "required by the workflow")]
        posing = {"tenant_id": "evil", "session_id": "s-evil", "execution_id": "e-evil", "workflow_id": "w-evil"}
        execution, _ = await executor.create(
            "t",
            alone,
            inputs(n=1, c=posing, **posing),
            session_id="sess-1",
            request_id="",
            request_hash=None,
        )
        done = await executor.wait("t", execution.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_SUCCEEDED, done
        given = json_format.MessageToDict(done.outputs)["c"]["result"]
        assert given["tenant"] == "t"
        assert given["variables"]["n"] == 1
        own = {k: given["variables"][k] for k in ("tenant_id", "session_id", "execution_id", "workflow_id")}
        assert own == {
            "tenant_id": "t",
            "session_id": "sess-1",
            "execution_id": done.execution_id,
            "workflow_id": "own_vars",
        }
        # Nor can a connection, or a config default of the same name, set one.
        connected = wf(
            "own_vars_connected",
            [
                {"type": "SayNode", "name": "s", "config": {"text": "evil"}},
                {"type": "PythonCodeNode", "name": "c", "config": {"code": code, "n": 1, "workflow_id": "w-evil"}},
            ],
            [("s", "result", "c", "tenant_id")],
        )
        execution, _ = await executor.create("t", connected, inputs(), session_id="", request_id="", request_hash=None)
        done = await executor.wait("t", execution.execution_id, 10)
        assert done is not None and done.state == Execution.STATE_SUCCEEDED, done
        variables = json_format.MessageToDict(done.outputs)["c"]["result"]["variables"]
        assert (variables["tenant_id"], variables["workflow_id"]) == ("t", "own_vars_connected")
    finally:
        await executor.shutdown()
        await store.close()


async def test_cancel_stops_running_nodes(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, store, bus = env
    events = bus.subscribe(lambda e: True)
    waiting = wf("waiting", [{"type": "GateNode", "name": "g", "config": {"gate": "never"}}])
    execution, _ = await executor.create("t", waiting, inputs(), session_id="", request_id="", request_hash=None)
    while (await events.next(5)).type != "node.started":  # type: ignore[union-attr]
        pass
    cancelled = await executor.cancel("t", execution.execution_id)
    assert cancelled is not None and cancelled.state == Execution.STATE_CANCELLED
    assert cancelled.node_runs[0].state == NodeRun.STATE_CANCELLED
    assert (await store.get_execution("t", execution.execution_id)).state == Execution.STATE_CANCELLED  # type: ignore[union-attr]
    again = await executor.cancel("t", execution.execution_id)
    assert again is not None and again.state == Execution.STATE_CANCELLED, "cancelling twice changes nothing"


async def test_events_follow_the_execution(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    executor, _, bus = env
    events = bus.subscribe(lambda e: True)
    await run(executor, wf("one", [{"type": "AddNode", "name": "a"}]), x=1)
    types = []
    while (event := await events.next(0.01)) is not None:
        types.append(event.type)
    assert types == ["execution.started", "node.started", "node.completed", "execution.progress", "execution.completed"]


async def test_recovery_resumes_after_finished_nodes_and_fails_unsafe_ones(tmp_path: Path) -> None:
    CALLS.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    chain = wf(
        "chain",
        [
            {"type": "AddNode", "name": "a", "config": {"add": 1}},
            {"type": "AddNode", "name": "b", "config": {"add": 1}},
        ],
        [("a", "result", "b", "x")],
    )
    unsafe = wf("unsafe", [{"type": "GateNode", "name": "g"}])
    for workflow in (chain, unsafe):
        await store.create_workflow("t", workflow, None)
    # What a crashed process leaves behind: `a` finished, `b` running; and an
    # unsafe node caught running.
    resumable = Execution(
        execution_id="exe_1",
        workflow_id="chain",
        workflow_version=1,
        tenant="t",
        state=Execution.STATE_RUNNING,
        inputs=inputs(x=1),
    )
    resumable.outputs.update({"a": {"result": 2}})
    resumable.node_runs.add(node_id="a", node_type="AddNode", state=NodeRun.STATE_SUCCEEDED, attempts=1)
    resumable.node_runs.add(node_id="b", node_type="AddNode", state=NodeRun.STATE_RUNNING, attempts=1)
    stuck = Execution(
        execution_id="exe_2", workflow_id="unsafe", workflow_version=1, tenant="t", state=Execution.STATE_RUNNING
    )
    stuck.node_runs.add(node_id="g", node_type="GateNode", state=NodeRun.STATE_RUNNING, attempts=1)
    for execution in (resumable, stuck):
        execution.create_time.GetCurrentTime()
        await store.insert_execution("t", execution, None)
    executor = Executor(store, PlanCache(REGISTRY), EventBus(), NodeServices(), max_concurrent=4)
    assert await executor.recover() == (1, 1)
    done = await executor.wait("t", "exe_1", 10)
    assert done is not None and done.state == Execution.STATE_SUCCEEDED
    assert json_format.MessageToDict(done.outputs)["b"] == {"result": 3.0}
    assert CALLS == {"b": 1}, "a finished node is not run again"
    failed = await store.get_execution("t", "exe_2")
    assert failed is not None and failed.state == Execution.STATE_FAILED
    assert "not safe to run twice" in failed.error.message
    assert CALLS.get("g") is None, "an unsafe node is never run twice"
    await executor.shutdown()
    await store.close()


async def test_concurrent_executions_share_commits(env: tuple[Executor, SqliteStore, EventBus]) -> None:
    _executor, store, _ = env
    many = Executor(store, PlanCache(REGISTRY), EventBus(), NodeServices(), max_concurrent=200)
    one = wf("one", [{"type": "AddNode", "name": "a"}])
    before = store.write_batches
    results = await asyncio.gather(*(run(many, one, x=i) for i in range(100)))
    assert all(r.state == Execution.STATE_SUCCEEDED for r in results)
    batches, writes = (a - b for a, b in zip(store.write_batches, before, strict=True))
    assert writes == 200, "each execution is written as it starts (RUNNING) and as it ends"
    assert batches < writes / 2, f"{batches} commits for {writes} writes: writes were not grouped"


async def test_a_waited_execution_of_rerunnable_nodes_is_written_once_when_it_ends(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    executor, store, bus = env
    chain = wf(
        "waited",
        [{"type": "AddNode", "name": "a", "config": {"add": 1}}, {"type": "AddNode", "name": "b"}],
        [("a", "result", "b", "x")],
    )
    events = bus.subscribe(lambda event: event.type in ("execution.started", "execution.completed"))
    before = store.write_batches[1]
    execution, _ = await executor.create(
        "t", chain, inputs(x=1), session_id="", request_id="", request_hash=None, waited=True
    )
    assert await store.get_execution("t", execution.execution_id) is None, "written before it ended"
    assert (await executor.get("t", execution.execution_id)) is not None, "this process sees it running"
    done = await executor.wait("t", execution.execution_id, 10)
    assert done is not None and done.state == Execution.STATE_SUCCEEDED
    assert done.outputs["b"]["result"] == 2
    assert store.write_batches[1] - before == 1
    stored = await store.get_execution("t", execution.execution_id)
    assert stored is not None and stored.state == Execution.STATE_SUCCEEDED and len(stored.node_runs) == 2
    announced = [await events.next(5) for _ in range(2)]
    assert [e.type for e in announced if e is not None] == ["execution.started", "execution.completed"]

    # With a request id (a retry must find the first run's record) it is written as it starts.
    keyed, _ = await executor.create(
        "t", chain, inputs(x=1), session_id="", request_id="r1", request_hash=b"h", waited=True
    )
    assert await store.get_execution("t", keyed.execution_id) is not None
    await executor.wait("t", keyed.execution_id, 10)


async def test_a_waited_execution_still_running_when_the_wait_ends_is_written_then(
    env: tuple[Executor, SqliteStore, EventBus],
) -> None:
    executor, store, _ = env
    gated = wf("gated", [{"type": "SafeGateNode", "name": "g", "config": {"gate": "g"}}])
    execution, _ = await executor.create(
        "t", gated, inputs(), session_id="", request_id="", request_hash=None, waited=True
    )
    snapshot = await executor.wait("t", execution.execution_id, 0.05)
    assert snapshot is not None and snapshot.state == Execution.STATE_RUNNING
    stored = await store.get_execution("t", execution.execution_id)
    assert stored is not None and stored.state == Execution.STATE_RUNNING, "its id was handed out"
    GATES["g"].set()
    done = await executor.wait("t", execution.execution_id, 10)
    assert done is not None and done.state == Execution.STATE_SUCCEEDED
    stored = await store.get_execution("t", execution.execution_id)
    assert stored is not None and stored.state == Execution.STATE_SUCCEEDED


async def test_a_fault_of_the_gateway_fails_the_execution_and_publishes_system_error(
    env: tuple[Executor, SqliteStore, EventBus], monkeypatch: pytest.MonkeyPatch
) -> None:
    executor, store, bus = env
    events = bus.subscribe(lambda event: event.type in ("system.error", "execution.failed"))
    saving, failures = store.save_execution, [RuntimeError("the disk is full at /secret/path")]

    async def failing_save(execution: Execution, *, wait: bool = True) -> None:
        if execution.node_runs and wait and failures:  # the durable write a node's dependents wait for
            raise failures.pop()
        await saving(execution, wait=wait)

    monkeypatch.setattr(store, "save_execution", failing_save)
    chain = wf(
        "faulty",
        [{"type": "AddNode", "name": "a", "config": {"add": 1}}, {"type": "AddNode", "name": "b"}],
        [("a", "result", "b", "x")],
    )
    done = await run(executor, chain, x=1)
    assert done.state == Execution.STATE_FAILED and done.error.message == "internal error: RuntimeError"
    first, second = await events.next(5), await events.next(5)
    assert first is not None and second is not None
    assert (first.type, first.execution_id, first.data) == (
        "system.error",
        done.execution_id,
        {"error": "internal error: RuntimeError", "source": "executor"},
    )
    assert second.type == "execution.failed"
    events.close()


class _ReadThatFailsWhenCancelled:
    """A work queue whose blocked read ends as a connection error when cancelled, as redis-py's can."""

    def __init__(self) -> None:
        self.reads = 0

    async def take(self, count: int) -> list[Any]:
        self.reads += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise QueueUnavailable("Connection closed by server.") from None
        return []

    async def reclaim(self, idle_ms: int, count: int = 100) -> list[Any]:
        return []

    async def queued(self, page: int = 1000) -> set[str]:
        return set()


@pytest.mark.timeout(30)  # unfixed, the loop never ends: the test fails here rather than hanging the suite
async def test_shutdown_ends_a_queue_read_that_turns_cancellation_into_an_error(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    queue = _ReadThatFailsWhenCancelled()
    executor = Executor(
        store, PlanCache(REGISTRY), EventBus(), NodeServices(), max_concurrent=1, queue=cast(WorkQueue, queue)
    )
    executor.start_leasing()
    try:
        for _ in range(100):  # the consumer reaches its blocked read
            if queue.reads:
                break
            await asyncio.sleep(0.01)
        assert queue.reads == 1
        async with asyncio.timeout(10):  # without the fix the consumer retries forever and this never returns
            await executor.shutdown()
        assert queue.reads == 1  # stopped, not retried
    finally:
        await store.close()


async def test_a_long_chain_after_a_large_state_stops_writing_each_safe_node(
    env: tuple[Executor, SqliteStore, EventBus], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write after a node's end is the whole execution: past the budget, nodes safe to rerun
    are written with the next write that must be made (here, before the unsafe node and at the
    end), so a chain of 40 nodes costs a bounded number of writes, and the end holds every output."""
    monkeypatch.setattr(walk, "INTERMEDIATE_WRITE_BYTES", 4000)
    executor, store, _ = env
    saves: list[int] = []
    real = store.save_execution

    async def counted(execution: Execution, *, wait: bool = True) -> None:
        saves.append(execution.ByteSize())
        await real(execution, wait=wait)

    monkeypatch.setattr(store, "save_execution", counted)
    nodes = [{"type": "AddNode", "name": f"n{i}", "config": {"add": 1}} for i in range(40)]
    nodes.append({"type": "GateNode", "name": "unsafe", "config": {}})
    links = [(f"n{i}", "result", f"n{i + 1}", "x") for i in range(39)] + [("n39", "result", "unsafe", "x")]
    done = await run(executor, wf("long", nodes, links), x=0)
    assert done.state == Execution.STATE_SUCCEEDED
    # Not waited, so stored as it goes: writes until the budget, then the unsafe node's RUNNING
    # and its end, then the execution's end (43 writes without the budget).
    assert 3 <= len(saves) < 20, saves
    stored = await store.get_execution("t", done.execution_id)
    assert stored == done and json_format.MessageToDict(stored.outputs)["n39"] == {"result": 40.0}


@pytest.mark.parametrize("waited", [False, True], ids=["stored_at_start", "written_once_at_its_end"])
async def test_an_end_the_store_refused_is_written_once_the_store_takes_it(
    env: tuple[Executor, SqliteStore, EventBus], monkeypatch: pytest.MonkeyPatch, waited: bool
) -> None:
    """The database down when an execution ends: its caller gets the end, and the record follows
    when the database is back (it used to keep RUNNING, or nothing at all, for good)."""
    executor, store, _ = env
    monkeypatch.setattr(walk, "RECORD_RETRY_FIRST", 0.01)
    refused = {"save_execution": 0, "save_execution_end": 0, "insert_execution": 0}

    def refusing(name: str) -> Any:
        real = getattr(store, name)

        async def write(*args: Any, **kwargs: Any) -> Any:
            execution = next(a for a in args if isinstance(a, Execution))
            if execution.state == Execution.STATE_SUCCEEDED and sum(refused.values()) < 3:
                refused[name] += 1
                raise StoreUnavailable("cannot connect to the database: OperationalError")
            return await real(*args, **kwargs)

        return write

    for name in refused:
        monkeypatch.setattr(store, name, refusing(name))
    chain = wf("ends", [{"type": "AddNode", "name": "a", "config": {"add": 1}}])
    execution, _ = await executor.create(
        "t", chain, inputs(x=1), session_id="", request_id="", request_hash=None, waited=waited
    )
    done = await executor.wait("t", execution.execution_id, 10)
    assert done is not None and done.state == Execution.STATE_SUCCEEDED, "the caller has the end at once"
    for _ in range(200):
        stored = await store.get_execution("t", execution.execution_id)
        if stored is not None and stored.state == Execution.STATE_SUCCEEDED:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"the end was never recorded: {stored}")
    assert sum(refused.values()) == 3 and json_format.MessageToDict(stored.outputs) == {"a": {"result": 2.0}}
    for _ in range(100):  # its slot, kept while the end waited (its lease renewed), is given back
        if not executor._slots.runs:
            break
        await asyncio.sleep(0.01)
    assert not executor._slots.runs


async def test_a_late_end_never_overwrites_a_process_that_took_the_execution_over(
    env: tuple[Executor, SqliteStore, EventBus], monkeypatch: pytest.MonkeyPatch
) -> None:
    executor, store, _ = env
    monkeypatch.setattr(walk, "RECORD_RETRY_FIRST", 0.05)
    real = store.save_execution

    async def refused_once(execution: Execution, **kwargs: Any) -> None:
        if execution.state == Execution.STATE_SUCCEEDED:
            # Meanwhile (the store away, this process's lease run out) another process took it over.
            await store._write(
                lambda conn: conn.execute(
                    "UPDATE executions SET owner='other' WHERE execution_id=?", (execution.execution_id,)
                )
            )
            raise StoreUnavailable("cannot connect to the database: OperationalError")
        await real(execution, **kwargs)

    monkeypatch.setattr(store, "save_execution", refused_once)
    execution, _ = await executor.create(
        "t",
        wf("taken", [{"type": "AddNode", "name": "a"}]),
        inputs(x=1),
        session_id="",
        request_id="",
        request_hash=None,
    )
    assert (await executor.wait("t", execution.execution_id, 10)).state == Execution.STATE_SUCCEEDED
    for _ in range(100):
        if not executor._slots.runs:
            break
        await asyncio.sleep(0.02)
    stored = await store.get_execution("t", execution.execution_id)
    assert stored is not None and stored.state == Execution.STATE_RUNNING, "left to the process that took it"
