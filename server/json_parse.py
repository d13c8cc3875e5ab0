"""JSON parsed without the cyclic garbage collector running meanwhile.

Parsing makes a container per JSON array and object, and every 700 new
containers set off a collection; as they pile up, some of those walk the
whole heap. A worker's answer or an HTTP response of a few MiB (a million
lists in 4 MiB of `[[],[],…]`) then took about four times as long as the
parse itself, all of it on the event loop. Parsed JSON holds no reference
cycles, so no collection during the parse could free anything.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from typing import Any

import orjson


def _paused(parse: Callable[[Any], Any], data: bytes | str) -> Any:
    if not gc.isenabled():
        return parse(data)
    gc.disable()
    try:
        return parse(data)
    finally:
        gc.enable()


def loads(data: bytes | str) -> Any:
    """`orjson.loads(data)`, the collector paused (module docstring)."""
    return _paused(orjson.loads, data)


def loads_python(text: str) -> Any:
    """`json.loads(text)` (NaN, Infinity and integers of any size, as Python's json reads them), the
    collector paused (module docstring)."""
    return _paused(json.loads, text)
