"""Which node types exist: the built-in ones plus those plugged in through
the `flowport.nodes` entry point group.

A plug-in package declares, in its pyproject.toml:

    [project.entry-points."flowport.nodes"]
    MyNode = "my_package.nodes:MyNode"

where `MyNode` subclasses `flowport.server.nodes.base.NodeType`. A plug-in
that fails to load is logged and skipped; it never stops the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib import metadata

from flowport.server.nodes.base import NodeType

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "flowport.nodes"


def builtin_types() -> list[type[NodeType]]:
    """The node types that ship with flowport."""
    from flowport.server.nodes.builtins import MergeNode, SwitchNode, TransformNode
    from flowport.server.nodes.http import HTTPRequestNode, RESTClientNode
    from flowport.server.nodes.permission_check import PermissionCheckNode
    from flowport.server.nodes.python_code import PythonCodeNode
    from flowport.server.nodes.rate_limited import RateLimitedAPINode
    from flowport.server.nodes.service_discovery import MCPServiceDiscoveryNode
    from flowport.server.nodes.sql import AsyncSQLDatabaseNode, SQLDatabaseNode

    return [
        PythonCodeNode,
        HTTPRequestNode,
        RESTClientNode,
        SQLDatabaseNode,
        AsyncSQLDatabaseNode,
        SwitchNode,
        MergeNode,
        TransformNode,
        PermissionCheckNode,
        MCPServiceDiscoveryNode,
        RateLimitedAPINode,
    ]


def plugin_types() -> list[type[NodeType]]:
    """Node types from installed packages' `flowport.nodes` entry points."""
    found = []
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception:
            log.exception("node type plug-in %s (%s) failed to load; skipped", entry.name, entry.value)
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, NodeType)):
            log.error("node type plug-in %s (%s) is not a NodeType subclass; skipped", entry.name, entry.value)
            continue
        found.append(loaded)
    return found


class NodeRegistry:
    """Node types by name, each instantiated once."""

    def __init__(self, types: Iterable[type[NodeType]]) -> None:
        self._types: dict[str, NodeType] = {}
        for node_type in types:
            if node_type.type_name in self._types:
                log.error("node type %s is defined twice; the first definition is kept", node_type.type_name)
                continue
            self._types[node_type.type_name] = node_type()

    @classmethod
    def default(cls) -> NodeRegistry:
        """Built-in types, then plug-ins (which cannot replace a built-in)."""
        return cls([*builtin_types(), *plugin_types()])

    def get(self, type_name: str) -> NodeType | None:
        """The node type, or None when unknown."""
        return self._types.get(type_name)

    def names(self) -> list[str]:
        """Every known type name, sorted."""
        return sorted(self._types)
