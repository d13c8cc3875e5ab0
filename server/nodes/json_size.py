"""How large a JSON-like value is at least, written out, without writing it.

Values built by substitution or by a node keep shared parts by reference:
`["${x}"] * 150000` is one string held 150,000 times, small in memory and
huge as JSON or as a protobuf Struct. `json_size` measures each shared value
once and counts it as often as it appears, and stops once past a bound, so
a caller refuses such a value before spending the time (and memory) of
writing it out. It is a lower bound of both the JSON and the Struct encoding
(a character of a string, a byte of a key, one per value and container), so
a value it puts past a limit is past it written out either way.
"""

from __future__ import annotations

from typing import Any


def json_size(value: Any, most: int) -> int:
    """A lower bound of `value`'s size written out (module docstring); stops once past `most`."""
    sizes: dict[int, int] = {}

    def size(item: Any) -> int:
        known = sizes.get(id(item))
        if known is not None:
            return known
        total = 1
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                total += len(str(key)) + size(child)
                if total > most:
                    break
        elif isinstance(item, list | tuple):
            for child in item:
                total += size(child)
                if total > most:
                    break
        if isinstance(item, dict | list | tuple | str):
            sizes[id(item)] = total  # the value outlives this walk: its id names it throughout
        return total

    return size(value)
