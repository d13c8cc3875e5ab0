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

from flowport.server.engine.values import TooDeep, TooLarge, python_to_struct_in_turns
from flowport.server.nodes.base import MAX_OUTPUT_BYTES, NodeError

# Objects and lists inside one node's outputs (JSON depth; the Kailash
# examples use 3 or 4).
MAX_DEPTH = 20
# One node's outputs, serialized.
MAX_NODE_BYTES = MAX_OUTPUT_BYTES
# A whole execution as its nodes' outputs are added (its inputs counted, from
# the start): with the node runs still to come it stays within the 16 MiB the
# API answers with (limits.MAX_MESSAGE_BYTES).
MAX_EXECUTION_BYTES = 12 * 2**20


async def built_outputs(node_id: str, value: dict[str, Any]) -> bytes:
    """A node's outputs as a serialized Struct `{node_id: value}`. Raises NodeError past a node's
    bounds, and TypeError/ValueError for a value that is not JSON.

    The Struct is built in turns, the event loop running other calls between them (values.py), and
    its build stops as soon as it is known to be past a node's bytes: outputs holding one value
    many times by reference (a TransformNode mapping many keys to one list) are small in memory and
    may be gigabytes as a Struct. It is serialized (and merged by `add_outputs` as bytes): a third
    less time than ByteSize and a MergeFrom copying each message, both on the event loop (about
    0.1 s for a node's 8 MiB of small values)."""
    try:
        # The node's outputs are the second level under {node_id: ...}.
        added = await python_to_struct_in_turns({node_id: value}, most_depth=MAX_DEPTH + 1, most_bytes=MAX_NODE_BYTES)
    except TooDeep:
        raise NodeError(
            f"outputs nest deeper than {MAX_DEPTH} objects and lists", reason="OUTPUT_TOO_DEEP", retryable=False
        ) from None
    except TooLarge:
        raise NodeError(
            f"outputs are more than a node's {MAX_NODE_BYTES} bytes", reason="OUTPUT_TOO_LARGE", retryable=False
        ) from None
    data = added.SerializeToString()
    if len(data) > MAX_NODE_BYTES:
        raise NodeError(
            f"outputs are {len(data)} bytes, more than a node's {MAX_NODE_BYTES}",
            reason="OUTPUT_TOO_LARGE",
            retryable=False,
        )
    return data


def add_outputs(
    outputs: struct_pb2.Struct, data: bytes, used: int, admit: Callable[[int], None] = lambda size: None
) -> int:
    """Add a node's outputs (`built_outputs`) to `outputs`, of an execution of `used` bytes; returns
    its bytes then. Raises NodeError (nothing added) past the execution's bound. `admit` is given
    the outputs' size last, and may refuse them (a NodeError) or count them.

    Synchronous, and so to be called with `used` read after the build's last await: parallel nodes
    of one execution build their outputs at the same time, and each must count the others'."""
    size = len(data)
    if used + size > MAX_EXECUTION_BYTES:
        raise NodeError(
            f"outputs would bring the execution to {used + size} bytes, more than {MAX_EXECUTION_BYTES}",
            reason="EXECUTION_OUTPUT_TOO_LARGE",
            retryable=False,
        )
    admit(size)
    outputs.MergeFromString(data)
    return used + size
