"""The wall clock in microseconds, the unit every stored time uses.

A leaf module (nothing from flowport) so that any layer can read the clock
without importing the API layer.
"""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    """A Timestamp from microseconds since the epoch."""
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)
