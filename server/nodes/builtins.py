"""Small built-in nodes for routing and reshaping data, with no user code.

- SwitchNode routes its input to `true_output` or `false_output` by a
  condition; nodes behind the output not taken are skipped.
- MergeNode combines up to five inputs, runs with whichever arrived.
- TransformNode builds an object from dotted paths into its input.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from flowport.server.errors import shown
from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError, NodeType
from flowport.server.nodes.paths import MISSING, lookup, steps


def _contains(container: Any, item: Any) -> bool:
    try:
        return item in container
    except TypeError:
        return False


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "in": lambda a, b: _contains(b, a),
    "not_in": lambda a, b: not _contains(b, a),
    "contains": _contains,
    "is_null": lambda a, _: a is None,
    "is_not_null": lambda a, _: a is not None,
    "truthy": lambda a, _: bool(a),
}


class SwitchNode(NodeType):
    """Routes `input_data` to one of two outputs by a condition."""

    type_name = "SwitchNode"
    description = (
        "Evaluates `condition_field` (a dotted path into input_data; the whole input when empty) "
        "`operator` `value`, and passes input_data on to `true_output` or `false_output`; "
        "nodes connected to the other output are skipped."
    )
    category = "logic"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["operator"],
        "properties": {
            "condition_field": {"type": "string", "description": "dotted path into input_data"},
            "operator": {"enum": sorted(OPERATORS)},
            "value": {"description": "right-hand side of the comparison"},
            "input_data": {"description": "the value routed, when not connected"},
        },
        "additionalProperties": False,
    }
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["input_data"],
        "properties": {"input_data": {"description": "the value tested and routed"}, "value": {}},
    }
    outputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {
            "true_output": {"description": "input_data, when the condition holds"},
            "false_output": {"description": "input_data, when it does not"},
            "condition_result": {"type": "boolean"},
        },
    }
    retry_safe = True
    default_timeout = 5.0

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        if "input_data" not in params:
            raise NodeError("SwitchNode needs input_data (a connection or an execution input)", reason="MISSING_INPUT")
        data = params["input_data"]
        field = params.get("condition_field") or ""
        subject = lookup(data, steps(field)) if field else data
        if subject is MISSING:
            subject = None
        try:
            holds = bool(OPERATORS[params["operator"]](subject, params.get("value")))
        except TypeError as exc:
            raise NodeError(f"cannot compare: {exc}", reason="BAD_COMPARISON") from None
        # Only the taken branch's output exists; the other branch is skipped.
        return {"true_output" if holds else "false_output": data, "condition_result": holds}


class MergeNode(NodeType):
    """Combines the inputs that arrived, in order data1..data5."""

    type_name = "MergeNode"
    description = (
        "Combines data1..data5: `concat` makes one list (lists are flattened one level), "
        "`merge_dict` merges objects left to right. Runs when some branches were skipped."
    )
    category = "logic"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {"merge_type": {"enum": ["concat", "merge_dict"], "default": "concat"}},
        "additionalProperties": False,
    }
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {f"data{i}": {} for i in range(1, 6)},
    }
    outputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {"merged_data": {}},
    }
    output_aliases: ClassVar[Mapping[str, str]] = {"result": "merged_data"}
    retry_safe = True
    default_timeout = 5.0
    runs_on_partial_inputs = True

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        parts = [params[f"data{i}"] for i in range(1, 6) if f"data{i}" in params]
        if params.get("merge_type", "concat") == "merge_dict":
            merged: Any = {}
            for part in parts:
                if not isinstance(part, Mapping):
                    raise NodeError(f"merge_dict needs objects, got {type(part).__name__}", reason="BAD_INPUT")
                merged.update(part)
        else:
            merged = []
            for part in parts:
                merged.extend(part if isinstance(part, list) else [part])
        return {"merged_data": merged}


class TransformNode(NodeType):
    """Builds a new object from dotted paths into `data`; no code."""

    type_name = "TransformNode"
    description = (
        "Builds an object whose keys are those of `mapping` and whose values are looked up in `data` "
        "by dotted path (e.g. 'response.body.items[0].id'); `defaults` fill paths that are missing."
    )
    category = "transform"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["mapping"],
        "properties": {
            "mapping": {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1},
            "defaults": {"type": "object"},
            "strict": {"type": "boolean", "description": "fail on a missing path without default"},
        },
        "additionalProperties": False,
    }
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"description": "the value paths are looked up in"}},
    }
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"result": {"type": "object"}}}
    retry_safe = True
    default_timeout = 5.0

    def prepare(self, config: Mapping[str, Any]) -> dict[str, list[str | int]]:
        return {key: steps(path) for key, path in config["mapping"].items()}

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        data = params.get("data")
        defaults = params.get("defaults") or {}
        result: dict[str, Any] = {}
        for key, path in prepared.items():
            value = lookup(data, path)
            if value is MISSING:
                if key in defaults:
                    value = defaults[key]
                elif params.get("strict"):
                    raise NodeError(
                        f"path {shown(params['mapping'][key])} for {shown(key)} is not in data", reason="MISSING_PATH"
                    )
                else:
                    value = None
            result[key] = value
        return {"result": result}
