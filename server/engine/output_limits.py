"""What a node may add to its execution's outputs: bounded in depth and in size.

An execution is stored as one protobuf message, answered whole by
GetExecution and read back by whichever process takes it over. Protobuf
parses at most 100 nested messages, and each JSON object costs three of them
(Struct, its map entry, Value): outputs nested past about 30 objects would be
written, then never read again, and such a row once stopped every takeover
(storage/executions.py now sets one aside). Size is bounded for the same
reader, and for the server's memory: a node that returns gigabytes (a SQL
query of blobs, many HTTP bodies) must fail, not grow the execution until
GetExecution cannot answer it, or the process runs out of memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import struct_pb2

from flowport.server.engine.values import python_to_struct
from flowport.server.nodes.base import MAX_OUTPUT_BYTES, NodeError
from flowport.server.nodes.json_size import json_size

# Objects and lists inside one node's outputs (JSON depth; the Kailash
# examples use 3 or 4).
MAX_DEPTH = 20
# One node's outputs, serialized.
MAX_NODE_BYTES = MAX_OUTPUT_BYTES
# A whole execution as its nodes' outputs are added (its inputs counted, from
# the start): with the node runs still to come it stays within the 16 MiB the
# API answers with (limits.MAX_MESSAGE_BYTES).
MAX_EXECUTION_BYTES = 12 * 2**20


def add_outputs(
    outputs: struct_pb2.Struct,
    node_id: str,
    value: dict[str, Any],
    used: int,
    admit: Callable[[int], None] = lambda size: None,
) -> int:
    """Add a node's outputs under its id to `outputs`, of an execution of `used` bytes; returns its
    bytes then. Raises NodeError (nothing added) past a bound, and TypeError/ValueError for a
    value that is not JSON. `admit` is given the outputs' size last, and may refuse them (a
    NodeError) or count them."""
    too_deep, shared = _outline(value, MAX_DEPTH)
    if too_deep:
        raise NodeError(
            f"outputs nest deeper than {MAX_DEPTH} objects and lists", reason="OUTPUT_TOO_DEEP", retryable=False
        )
    # Outputs holding one value many times by reference (a TransformNode mapping many keys to one
    # list) are small in memory and may be gigabytes as a Struct, built on the event loop: those
    # are measured first (each shared value once). The others take as long to build as to walk.
    if shared and json_size(value, MAX_NODE_BYTES) > MAX_NODE_BYTES:
        raise NodeError(
            f"outputs are more than a node's {MAX_NODE_BYTES} bytes", reason="OUTPUT_TOO_LARGE", retryable=False
        )
    added = python_to_struct({node_id: value})
    size = added.ByteSize()
    if size > MAX_NODE_BYTES:
        raise NodeError(
            f"outputs are {size} bytes, more than a node's {MAX_NODE_BYTES}", reason="OUTPUT_TOO_LARGE", retryable=False
        )
    if used + size > MAX_EXECUTION_BYTES:
        raise NodeError(
            f"outputs would bring the execution to {used + size} bytes, more than {MAX_EXECUTION_BYTES}",
            reason="EXECUTION_OUTPUT_TOO_LARGE",
            retryable=False,
        )
    admit(size)
    outputs.MergeFrom(added)
    return used + size


def _outline(value: Any, limit: int) -> tuple[bool, bool]:
    """(whether dicts and lists nest in `value` more than `limit` levels, whether one of them is held
    more than once); without recursion, each walked again only when met deeper than before (at most
    `limit` times), so a list held many times is not walked as often."""
    deepest: dict[int, int] = {}
    shared = False
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True, shared
        seen = deepest.get(id(item))
        if seen is not None:
            shared = True
            if seen >= depth:
                continue
        deepest[id(item)] = depth
        children: Any = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
    return False, shared
