"""A custom node type, plugged in through the `flowport.nodes` entry point group.

Put a class like this in your own package and declare it in that package's
pyproject.toml; once the package is installed next to flowport, every
server process picks it up at start:

    [project.entry-points."flowport.nodes"]
    SlugifyNode = "my_package.nodes:SlugifyNode"

It then validates, runs and shows up in `GET /api/schemas/nodes` like a
built-in type. Keep `run` non-blocking: it shares the server's event loop.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError, NodeType


class SlugifyNode(NodeType):
    """Turns `text` into a URL slug: lower case, words joined by `separator`."""

    type_name = "SlugifyNode"
    description = "Turns text into a URL slug (lower case, ASCII letters and digits joined by a separator)."
    category = "transform"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {"separator": {"type": "string", "maxLength": 3, "default": "-"}},
        "additionalProperties": False,
    }
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}},
    }
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {"slug": {"type": "string"}}}
    # Pure function of its inputs: retries and resumes are harmless.
    retry_safe = True
    default_timeout = 5.0

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        text = params.get("text")
        if not isinstance(text, str):
            raise NodeError("text must be a string", reason="BAD_INPUT")
        words = re.findall(r"[a-z0-9]+", text.lower())
        return {"slug": params.get("separator", "-").join(words)}
