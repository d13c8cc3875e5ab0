"""The edge Lua filter's source (edge.lua), with the settings it reads written in front of it."""

from __future__ import annotations

import json
from importlib import resources

from flowport.server.settings import Settings


def edge_source(settings: Settings) -> str:
    """edge.lua preceded by COOKIE_ORIGINS: the --cors-origins a cookie credential may come from ('*' is not one)."""
    origins = [origin for origin in settings.cors_origins if origin != "*"]
    # JSON strings are Lua strings for these (origins are printable ASCII, no backslash escapes but \" and \\).
    entries = "".join(f"[{json.dumps(origin, ensure_ascii=True)}] = true, " for origin in origins)
    lua = resources.files("flowport.transcoder").joinpath("edge.lua").read_text("utf-8")
    return f"local COOKIE_ORIGINS = {{ {entries}}}\n" + lua
