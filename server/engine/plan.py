"""A workflow version compiled once into what the executor walks.

The plan holds each node's type, static config and the type's prepared
form of it (e.g. compiled code), its timeout and retry policy, where each
of its inputs comes from, and which nodes wait for it. Plans are cached per
(tenant, workflow, version): versions never change, so entries never go
stale, and the cache is bounded.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from flowport.server.engine.checks import WorkflowChecks
from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.validation import node_id, validate
from flowport.server.engine.values import struct_to_python
from flowport.server.errors import FailedPrecondition
from flowport.server.nodes.base import JsonSchema, NodeType
from flowport.server.nodes.paths import steps
from flowport.v1 import workflow_pb2

DEFAULT_INITIAL_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 30.0


class InvalidWorkflow(ValueError):
    """The workflow does not validate; `violations` say why."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {d}" for p, d in violations))
        self.violations = violations


@dataclass(frozen=True)
class Binding:
    """One connection into a node: value at `path` of `from_node`'s outputs goes to `to_input`."""

    from_node: str
    path: tuple[str | int, ...]
    to_input: str


@dataclass(frozen=True)
class PlanNode:
    """One node, ready to run."""

    node_id: str
    node_type: NodeType
    config: dict[str, Any]
    prepared: Any
    timeout: float
    max_attempts: int
    initial_backoff: float
    max_backoff: float
    inbound: tuple[Binding, ...]
    upstream: frozenset[str]
    downstream: tuple[str, ...]
    retry_safe: bool
    reads: frozenset[str] | None


@dataclass(frozen=True)
class Plan:
    """A compiled workflow version."""

    workflow_id: str
    version: int
    nodes: dict[str, PlanNode]
    order: tuple[str, ...]

    @cached_property
    def rerunnable(self) -> bool:
        """Whether every node is safe to run twice (a run cut short loses nothing a rerun does not redo)."""
        return all(node.retry_safe for node in self.nodes.values())

    @cached_property
    def inputs_schema(self) -> JsonSchema:
        """JSON Schema of execution inputs: required node inputs nothing else provides (what a
        node's schema requires, the inputs its config's `${name}` references need, a code node's
        free variables), less what a connection into the node or its own config gives."""
        properties: dict[str, Any] = {}
        required: set[str] = set()
        for node in self.nodes.values():
            if node.node_id in properties:
                continue
            bound = {b.to_input for b in node.inbound} | set(node.config)
            schema = node.node_type.inputs_schema
            for name in sorted(node.node_type.required_inputs(node.config)):
                if name not in bound:
                    properties[name] = schema.get("properties", {}).get(name, {})
                    required.add(name)
        return {"type": "object", "properties": properties, "required": sorted(required)}

    @cached_property
    def required_by(self) -> dict[str, tuple[str, ...]]:
        """Each required execution input (as in inputs_schema), with the nodes that need it."""
        needs: dict[str, list[str]] = {}
        for node in self.nodes.values():
            bound = {b.to_input for b in node.inbound} | set(node.config)
            for name in sorted(node.node_type.required_inputs(node.config)):
                if name not in bound:
                    needs.setdefault(name, []).append(node.node_id)
        return {name: tuple(nodes) for name, nodes in needs.items()}

    @cached_property
    def fixed_params(self) -> dict[str, frozenset[str]]:
        """The parameters execution inputs may not set, of each node that has any (NodeType.fixed_params)."""
        return {nid: n.node_type.fixed_params for nid, n in self.nodes.items() if n.node_type.fixed_params}

    def fixed_inputs(self, values: Mapping[str, Any]) -> list[str]:
        """Where `values` sets such a parameter under a node's id, as `node.parameter`."""
        return [
            f"{nid}.{name}"
            for nid, fixed in self.fixed_params.items()
            if isinstance(given := values.get(nid), dict)
            for name in sorted(fixed & given.keys())
        ]

    def missing_inputs(self, values: Mapping[str, Any]) -> list[str]:
        """The required inputs `values` does not give, either at the top level or, as Kailash
        clients write them, under the id of every node that needs it (`{"echo": {"message": ...}}`)."""
        return sorted(
            name
            for name, nodes in self.required_by.items()
            if name not in values and not all(isinstance(values.get(n), dict) and name in values[n] for n in nodes)
        )

    def outputs_schema(self) -> JsonSchema:
        """JSON Schema of execution outputs, keyed by node id."""
        return {
            "type": "object",
            "properties": {nid: n.node_type.outputs_schema for nid, n in self.nodes.items()},
        }


def _seconds(duration: Any, default: float) -> float:
    return duration.ToNanoseconds() / 1e9 if duration.ByteSize() else default


def compile_plan(workflow: workflow_pb2.Workflow, registry: NodeRegistry) -> Plan:
    """Compile a workflow version. Raises InvalidWorkflow when it does not validate."""
    problems = validate(workflow, registry)
    if problems:
        raise InvalidWorkflow(problems)
    inbound: dict[str, list[Binding]] = {node_id(n): [] for n in workflow.nodes}
    downstream: dict[str, list[str]] = {node_id(n): [] for n in workflow.nodes}
    types = {node_id(n): registry.get(n.type) for n in workflow.nodes}
    for conn in workflow.connections:
        path = steps(conn.from_output)
        source_type = types[conn.from_node]
        assert source_type is not None  # validated
        alias = source_type.output_aliases.get(str(path[0])) if path else None
        if alias is not None:
            path = [*steps(alias), *path[1:]]
        inbound[conn.to_node].append(Binding(conn.from_node, tuple(path), conn.to_input))
        if conn.to_node not in downstream[conn.from_node]:
            downstream[conn.from_node].append(conn.to_node)
    nodes: dict[str, PlanNode] = {}
    for node in workflow.nodes:
        nid = node_id(node)
        node_type = registry.get(node.type)
        assert node_type is not None  # validated
        config = struct_to_python(node.config)
        attempts = node.retry.max_attempts or 1
        nodes[nid] = PlanNode(
            node_id=nid,
            node_type=node_type,
            config=config,
            prepared=node_type.prepare(config),
            timeout=_seconds(node.timeout, node_type.default_timeout),
            max_attempts=attempts,
            initial_backoff=_seconds(node.retry.initial_backoff, DEFAULT_INITIAL_BACKOFF),
            max_backoff=_seconds(node.retry.max_backoff, DEFAULT_MAX_BACKOFF),
            inbound=tuple(inbound[nid]),
            upstream=frozenset(b.from_node for b in inbound[nid]),
            downstream=tuple(downstream[nid]),
            retry_safe=node_type.is_retry_safe(config),
            reads=None if (reads := node_type.reads(config)) is None else frozenset(reads),
        )
    plan = Plan(workflow.workflow_id, workflow.version, nodes, _topological(nodes))
    # Worked out now, where a large workflow is compiled off the event loop (engine/checks.py), not
    # at its first run: 270,000 references take about a second to walk.
    _ = plan.inputs_schema, plan.required_by
    return plan


def _topological(nodes: dict[str, PlanNode]) -> tuple[str, ...]:
    waiting = {nid: len(n.upstream) for nid, n in nodes.items()}
    ready = deque(nid for nid, count in waiting.items() if count == 0)
    order: list[str] = []
    while ready:
        current = ready.popleft()
        order.append(current)
        for child in nodes[current].downstream:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return tuple(order)


class PlanCache:
    """Compiled plans by (tenant, workflow_id, version), least recently used out first.

    Bounded in plans and in the bytes of the workflows they were compiled from (a plan holds its
    nodes' configs as Python values, several times their serialized size), so a tenant cycling
    through large versions cannot make the cache hold gigabytes. Large workflows are compiled on
    the checks' thread (checks.py), never on the event loop.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        capacity: int = 1024,
        max_bytes: int = 64 * 2**20,
    ) -> None:
        self._registry = registry
        self._capacity = capacity
        self._max_bytes = max_bytes
        self.checks = WorkflowChecks()
        self._plans: OrderedDict[tuple[str, str, int], tuple[Plan, int]] = OrderedDict()
        self._bytes = 0
        self._compiling: dict[tuple[str, str, int], asyncio.Future[Plan]] = {}

    async def get(self, tenant: str, workflow: workflow_pb2.Workflow) -> Plan:
        """The plan for this stored workflow version, compiled on first use (once, however many
        calls ask for it while it compiles)."""
        key = (tenant, workflow.workflow_id, workflow.version)
        kept = self._plans.get(key)
        if kept is not None:
            self._plans.move_to_end(key)
            return kept[0]
        compiling = self._compiling.get(key)
        if compiling is None:
            # A task of its own: a caller that gives up leaves it to the others waiting for it.
            compiling = asyncio.ensure_future(self._compile(key, tenant, workflow))
            self._compiling[key] = compiling
            compiling.add_done_callback(lambda _: self._compiling.pop(key, None))
        return await asyncio.shield(compiling)

    async def runnable(self, tenant: str, workflow: workflow_pb2.Workflow) -> Plan:
        """`get` for a caller: a stored version that fails a check added since it was stored (one
        refused header, say) is FAILED_PRECONDITION naming what, not an internal error."""
        try:
            return await self.get(tenant, workflow)
        except InvalidWorkflow as exc:
            shown = "; ".join(f"{path}: {problem}" for path, problem in exc.violations[:5])
            raise FailedPrecondition(
                f"workflow {workflow.workflow_id!r} version {workflow.version} no longer validates"
                f" ({shown}); create a new version",
                reason="WORKFLOW_VERSION_INVALID",
                metadata={"workflow_id": workflow.workflow_id, "version": str(workflow.version)},
                violations=exc.violations,
            ) from None

    async def _compile(self, key: tuple[str, str, int], tenant: str, workflow: workflow_pb2.Workflow) -> Plan:
        plan = await self.checks.run(tenant, workflow, lambda: compile_plan(workflow, self._registry))
        size = workflow.ByteSize()
        self._plans[key] = (plan, size)
        self._bytes += size
        while len(self._plans) > self._capacity or (self._bytes > self._max_bytes and len(self._plans) > 1):
            _, (_, gone) = self._plans.popitem(last=False)
            self._bytes -= gone
        return plan
