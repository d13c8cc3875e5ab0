"""Workflow validation: every problem at once, each with a field path.

Rules: a valid name and id; at least one node; known node types; node ids given
(as `name` or `id`), well-formed and unique; node configs valid against
their type's JSON Schema; timeouts and retry policies within the type's
bounds; connections between existing nodes, from outputs the source
declares to inputs the target declares, one connection per input, and no
cycles.

Its cost is bounded whatever the request holds: the node and connection
counts and the configs' total size are checked first and alone, a node's
config is checked only up to a size, and at most MAX_PROBLEMS problems are
listed (the rest are counted in a last note; configs are no longer checked
once the list is full).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flowport.server.engine.registry import NodeRegistry
from flowport.server.engine.values import struct_to_python
from flowport.server.errors import shown
from flowport.server.nodes.base import NodeType
from flowport.server.nodes.paths import steps
from flowport.server.secrets.references import SECRET_NAME, secret_references
from flowport.v1 import workflow_pb2

Violation = tuple[str, str]

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
MAX_NODES = 500
# Ten per node: more than any workflow binds, few enough to check at once.
MAX_CONNECTIONS = 10 * MAX_NODES
# A node's config, serialized: room for the largest code (100,000 characters) and request bodies.
MAX_CONFIG_BYTES = 2**20
# All the nodes' configs together: checking them is the costly part (about 0.4 s a MiB).
MAX_CONFIGS_BYTES = 4 * 2**20
# A connection's from_output path and to_input name.
MAX_PATH_CHARS = 1024
# Problems listed at most; a last one says how many more there are.
MAX_PROBLEMS = 100
MAX_ATTEMPTS = 10
# A longer cycle is described by its first nodes and its length.
MAX_CYCLE_SHOWN = 8


# A workflow's name is for people: anything printable. Its id stays a path segment.
MAX_NAME_CHARS = 128
_NOT_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def workflow_id_of(workflow: workflow_pb2.Workflow) -> str:
    """The workflow's id: the one given, else its name when that is a valid id, else the name with
    each run of other characters made `_`, without `_`, `-` or `.` at either end; "" when nothing is left."""
    if workflow.workflow_id or NAME.match(workflow.name):
        return workflow.workflow_id or workflow.name
    made = _NOT_ID.sub("_", workflow.name).strip("_-.")
    return made if NAME.match(made) else ""


def config_of(node: workflow_pb2.Node) -> tuple[str, Any]:
    """The node's config and the field it came in: `config`, or Kailash's name `parameters` when
    only that is set."""
    if node.HasField("parameters") and not node.HasField("config"):
        return "parameters", node.parameters
    return "config", node.config


def stored_form(workflow: workflow_pb2.Workflow) -> None:
    """Make a valid `workflow` what the store keeps: its id set, `parameters` moved to `config`."""
    workflow.workflow_id = workflow_id_of(workflow)
    for node in workflow.nodes:
        field, config = config_of(node)
        if field == "parameters":
            node.config.CopyFrom(config)
            node.ClearField("parameters")


def node_id(node: workflow_pb2.Node) -> str:
    """The node's identifier: `name`, or `id` when `name` is empty."""
    return node.name or node.id


class Problems(list[Violation]):
    """What validate() found: at most MAX_PROBLEMS, then a note; `total` counts every problem found."""

    def __init__(self, listed: Iterable[Violation] = (), total: int = 0) -> None:
        super().__init__(listed)
        self.total = total


class _Found:
    """Problems as they are found: the first MAX_PROBLEMS kept, the rest only counted."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.kept: list[Violation] = []
        self.more = 0

    @property
    def full(self) -> bool:
        return len(self.kept) >= MAX_PROBLEMS

    def add(self, path: str, description: str) -> None:
        if self.full:
            self.more += 1
        else:
            self.kept.append((self.prefix + path, description))

    def extend(self, problems: Iterable[Violation]) -> None:
        for path, description in problems:
            self.add(path, description)

    def listed(self, unchecked: int) -> Problems:
        """The kept problems, and a note on what was left out."""
        total = len(self.kept) + self.more
        if not self.more and not unchecked:
            return Problems(self.kept, total)
        notes = []
        if self.more:
            notes.append(f"{self.more} more problem{'s' if self.more > 1 else ''} not listed")
        if unchecked:
            notes.append(f"the configs of {unchecked} more node{'s' if unchecked > 1 else ''} not checked")
        return Problems([*self.kept, (self.prefix.rstrip(".") or "workflow", "and " + "; ".join(notes))], total)


def validate(workflow: workflow_pb2.Workflow, registry: NodeRegistry, prefix: str = "") -> Problems:
    """Every problem with `workflow` (at most MAX_PROBLEMS, then a note); empty when it is valid.

    Paths get `prefix`.
    """
    found = _Found(prefix)
    _check_names(workflow, found)
    # The counts are checked first and alone: every other check's cost grows with them.
    if not workflow.nodes:
        found.add("nodes", "at least one node is required")
    elif len(workflow.nodes) > MAX_NODES:
        found.add("nodes", f"at most {MAX_NODES} nodes, got {len(workflow.nodes)}")
    if len(workflow.connections) > MAX_CONNECTIONS:
        found.add("connections", f"at most {MAX_CONNECTIONS} connections, got {len(workflow.connections)}")
    if len(workflow.nodes) > MAX_NODES or len(workflow.connections) > MAX_CONNECTIONS:
        return found.listed(0)
    configs = sum(config_of(node)[1].ByteSize() for node in workflow.nodes)
    if configs > MAX_CONFIGS_BYTES:
        found.add("nodes", f"the nodes' configs take at most {MAX_CONFIGS_BYTES} bytes together, got {configs}")
        return found.listed(0)
    ids: dict[str, int] = {}
    unchecked = 0
    for i, node in enumerate(workflow.nodes):
        # Configs cost the most to check: once the list is full, they are not.
        if not _check_node(i, node, registry, ids, found, check_config=not found.full):
            unchecked += 1
    _check_connections(workflow, registry, ids, found)
    return found.listed(unchecked)


def _check_names(workflow: workflow_pb2.Workflow, found: _Found) -> None:
    id_rule = "1 to 128 characters: letters, digits, '_', '-', '.', not starting with '-' or '.'"
    if not workflow.name.strip():
        found.add("name", "required")
    elif len(workflow.name) > MAX_NAME_CHARS:
        found.add("name", f"at most {MAX_NAME_CHARS} characters, got {len(workflow.name)}")
    elif not workflow.name.isprintable():
        found.add("name", "no control characters")
    elif workflow.workflow_id and not NAME.match(workflow.workflow_id):
        found.add("workflow_id", id_rule)
    elif not workflow_id_of(workflow):
        found.add("workflow_id", f"the name makes no id ({id_rule}): give workflow_id")


def _check_node(
    i: int, node: workflow_pb2.Node, registry: NodeRegistry, ids: dict[str, int], found: _Found, *, check_config: bool
) -> bool:
    """Adds `node`'s problems to `found`; False when its config was left unchecked."""
    where = f"nodes[{i}]"
    ident = node_id(node)
    if not ident:
        found.add(f"{where}.name", "a node needs an identifier in 'name' or 'id'")
    elif node.name and node.id and node.name != node.id:
        found.add(f"{where}.id", f"differs from name {shown(node.name)}; give one, or the same in both")
    elif not NODE_ID.match(ident):
        field = "name" if node.name else "id"
        found.add(
            f"{where}.{field}", "1 to 128 characters: letters, digits, '_', '-', '.', starting with a letter or '_'"
        )
    elif ident in ids:
        field = "name" if node.name else "id"
        found.add(f"{where}.{field}", f"duplicate node id {shown(ident)} (also nodes[{ids[ident]}])")
    else:
        ids[ident] = i
    if not node.type:
        found.add(f"{where}.type", "required")
        return True
    node_type = registry.get(node.type)
    if node_type is None:
        found.add(f"{where}.type", f"unknown node type {shown(node.type)}; known types: {', '.join(registry.names())}")
        return True
    config: dict[str, Any] | None = None
    field, given = config_of(node)
    if field == "config" and node.HasField("parameters"):
        found.add(f"{where}.parameters", "Kailash's name for config: give config or parameters, not both")
    size = given.ByteSize()
    if size > MAX_CONFIG_BYTES:
        found.add(f"{where}.{field}", f"at most {MAX_CONFIG_BYTES} bytes serialized, got {size}")
    elif check_config:
        config = struct_to_python(given)
        found.extend(node_type.validate_config(config, f"{where}.{field}"))
        found.extend(_check_secret_references(node_type, config, f"{where}.{field}"))
    if node.HasField("timeout"):
        seconds = node.timeout.ToNanoseconds() / 1e9
        if not 0 < seconds <= node_type.max_timeout:
            found.add(
                f"{where}.timeout", f"must be more than 0s and at most {node_type.max_timeout:g}s for {node.type}"
            )
    if node.HasField("retry"):
        attempts = node.retry.max_attempts
        if not 0 <= attempts <= MAX_ATTEMPTS:
            found.add(f"{where}.retry.max_attempts", f"between 0 and {MAX_ATTEMPTS}")
        elif attempts > 1 and config is not None and not node_type.is_retry_safe(config):
            found.add(f"{where}.retry", f"{node.type} is not safe to run twice, so it cannot be retried")
        backoffs = (("initial_backoff", node.retry.initial_backoff), ("max_backoff", node.retry.max_backoff))
        for field, duration in backoffs:
            if duration.ByteSize() and duration.ToNanoseconds() <= 0:
                found.add(f"{where}.retry.{field}", "must be positive")
    return check_config or size > MAX_CONFIG_BYTES


def _check_secret_references(node_type: NodeType, config: dict[str, Any], where: str) -> list[Violation]:
    """`${secret:NAME}` only with a valid name, and only where the node type resolves it
    (elsewhere it would be sent or run as written)."""
    problems: list[Violation] = []
    for path, name in secret_references(config):
        field = path.split(".", 1)[0].split("[", 1)[0]
        if not SECRET_NAME.match(name):
            problems.append(
                (
                    f"{where}.{path}",
                    f"secret name {shown(name, 140)}: "
                    "1 to 128 characters of A-Z, 0-9 and '_', not starting with a digit",
                )
            )
        elif field not in node_type.secret_fields:
            takes = ", ".join(sorted(node_type.secret_fields))
            problems.append(
                (
                    f"{where}.{path}",
                    f"{node_type.type_name} resolves ${{secret:...}} only in {takes}"
                    if takes
                    else f"{node_type.type_name} does not resolve ${{secret:...}}; HTTP and SQL nodes do",
                )
            )
    return problems


def _check_connections(
    workflow: workflow_pb2.Workflow, registry: NodeRegistry, ids: dict[str, int], found: _Found
) -> None:
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    bound: dict[tuple[str, str], int] = {}
    for k, conn in enumerate(workflow.connections):
        where = f"connections[{k}]"
        ok = True
        for field in ("from_node", "from_output", "to_node", "to_input"):
            if not getattr(conn, field):
                found.add(f"{where}.{field}", "required")
                ok = False
        for field in ("from_output", "to_input"):
            # Paths are split into steps: a long one would cost as much.
            if len(getattr(conn, field)) > MAX_PATH_CHARS:
                found.add(f"{where}.{field}", f"at most {MAX_PATH_CHARS} characters")
                ok = False
        if not ok:
            continue
        source = ids.get(conn.from_node)
        target = ids.get(conn.to_node)
        if source is None:
            found.add(f"{where}.from_node", f"no node with id {shown(conn.from_node)}")
        if target is None:
            found.add(f"{where}.to_node", f"no node with id {shown(conn.to_node)}")
        if source is None or target is None:
            continue
        source_type = registry.get(workflow.nodes[source].type)
        target_type = registry.get(workflow.nodes[target].type)
        output = str(next(iter(steps(conn.from_output)), ""))
        if source_type is not None and output not in source_type.output_names():
            found.add(
                f"{where}.from_output",
                f"{source_type.type_name} has no output {shown(output)}; "
                f"it has: {', '.join(source_type.output_names())}",
            )
        if target_type is not None and not target_type.open_inputs and conn.to_input not in target_type.input_names():
            found.add(
                f"{where}.to_input",
                f"{target_type.type_name} has no input {shown(conn.to_input)}; "
                f"it has: {', '.join(target_type.input_names())}",
            )
        key = (conn.to_node, conn.to_input)
        if key in bound:
            found.add(
                f"{where}.to_input",
                f"input {shown(conn.to_input)} of {shown(conn.to_node)} is already bound by connections[{bound[key]}]",
            )
        else:
            bound[key] = k
        if conn.from_node == conn.to_node:
            found.add(where, f"connects node {shown(conn.from_node)} to itself")
            continue
        edges[conn.from_node].append((conn.to_node, k))
    cycle = find_cycle(list(ids), edges)
    if cycle is not None:
        nodes, index = cycle
        if len(nodes) > MAX_CYCLE_SHOWN:
            nodes = [*nodes[: MAX_CYCLE_SHOWN - 1], f"… ({len(nodes) - 1} nodes)", nodes[-1]]
        found.add(f"connections[{index}]", "creates a cycle: " + " → ".join(nodes))


def find_cycle(nodes: list[str], edges: dict[str, list[tuple[str, int]]]) -> tuple[list[str], int] | None:
    """A cycle as (node path, index of its closing connection), or None.

    Depth-first, with an explicit stack: a long chain of nodes must not
    exhaust Python's recursion limit.
    """
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(nodes, white)
    for start in nodes:
        if color[start] != white:
            continue
        color[start] = grey
        path = [start]  # the grey nodes, in order
        # Per grey node: its outgoing edges and how many were followed.
        pending = [(edges.get(start, []), 0)]
        while pending:
            out, followed = pending[-1]
            if followed == len(out):
                pending.pop()
                color[path.pop()] = black
                continue
            pending[-1] = (out, followed + 1)
            target, index = out[followed]
            if color.get(target) == grey:
                return [*path[path.index(target) :], target], index
            if color.get(target) == white:
                color[target] = grey
                path.append(target)
                pending.append((edges.get(target, []), 0))
    return None
