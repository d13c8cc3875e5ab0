"""Node types: built-ins and plug-ins from the `flowport.nodes` entry point group."""

from __future__ import annotations

from importlib import metadata

import pytest

from flowport.server.engine import registry as registry_module
from flowport.server.engine.registry import ENTRY_POINT_GROUP, NodeRegistry, builtin_types, plugin_types
from flowport.server.nodes.base import NodeContext, NodeServices

SEED_TYPES = {"PythonCodeNode", "HTTPRequestNode", "RESTClientNode", "SQLDatabaseNode", "AsyncSQLDatabaseNode"}


def _entry_points(*points: metadata.EntryPoint) -> object:
    def select(group: str) -> list[metadata.EntryPoint]:
        return [p for p in points if p.group == group]

    return select


def test_builtins_include_the_seed_types_and_small_helpers() -> None:
    names = {t.type_name for t in builtin_types()}
    assert SEED_TYPES | {"SwitchNode", "MergeNode", "TransformNode"} <= names


async def test_a_plugin_from_an_entry_point_is_registered_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The installed-package metadata is what we stand in for; the class is the real example.
    point = metadata.EntryPoint("SlugifyNode", "flowport.clients.examples.custom_node:SlugifyNode", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry_module.metadata, "entry_points", _entry_points(point))
    registry = NodeRegistry.default()
    node = registry.get("SlugifyNode")
    assert node is not None
    ctx = NodeContext("t", "exe", "n", 1, 5.0, NodeServices())
    assert await node.run(ctx, None, {"text": "Hello, Flow Port!"}) == {"slug": "hello-flow-port"}


def test_a_broken_plugin_is_skipped_not_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    points = (
        metadata.EntryPoint("Missing", "no_such_module:Node", ENTRY_POINT_GROUP),
        metadata.EntryPoint("NotANode", "flowport.clients.examples.custom_node:re", ENTRY_POINT_GROUP),
    )
    monkeypatch.setattr(registry_module.metadata, "entry_points", _entry_points(*points))
    assert plugin_types() == []
    assert "Missing" in caplog.text and "not a NodeType subclass" in caplog.text


def test_a_plugin_cannot_replace_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    point = metadata.EntryPoint(
        "PythonCodeNode", "flowport.clients.examples.custom_node:SlugifyNode", ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(registry_module.metadata, "entry_points", _entry_points(point))
    from flowport.clients.examples.custom_node import SlugifyNode

    SlugifyNode.type_name = "PythonCodeNode"
    try:
        registry = NodeRegistry.default()
        assert type(registry.get("PythonCodeNode")).__name__ == "PythonCodeNode"
    finally:
        SlugifyNode.type_name = "SlugifyNode"
