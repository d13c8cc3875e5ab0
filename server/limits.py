"""Limits the API promises, in a module light enough for the Envoy config
renderer (`flowport up`'s supervisor) to import without the server."""

from __future__ import annotations

import math

# Seconds a request_id is remembered: a retry within this is answered with the first call's result.
REQUEST_ID_RETENTION = 24 * 3600.0

# The longest a CreateExecution may wait for its execution to end (wait_timeout),
# in seconds; Envoy's route for it must outlast this.
MAX_WAIT = 300.0

# The largest message the API answers with, in bytes (the server's own
# receive cap): Envoy's transcoder buffers a REST response up to this and
# the SDK accepts this much over gRPC.
MAX_MESSAGE_BYTES = 16 * 2**20
# A list page stops before this many bytes (it always holds at least one
# item), so a page fits gRPC's default 4 MiB receive limit whenever its
# items do, and stays well inside MAX_MESSAGE_BYTES.
MAX_PAGE_BYTES = 4 * 2**20 - 2**16
# Request metadata the server takes, soft and hard limit alike: gRPC's own
# defaults (8 KiB soft, 16 KiB hard) refuse calls between the two at random.
MAX_METADATA_BYTES = 64 * 2**10
# Request headers Envoy accepts (431 beyond): what it forwards, with its own
# additions and gRPC's 32 bytes of accounting per header, stays far under
# MAX_METADATA_BYTES.
MAX_REQUEST_HEADERS_KB = 32
MAX_REQUEST_HEADERS = 100
# Seconds a request's headers may take to arrive at Envoy, from their first byte: a client sending
# them a byte at a time (slowloris) holds its connection this long at most.
REQUEST_HEADERS_SECONDS = 10.0
# HTTP/2 streams one client connection to Envoy may have open at once, calls and event streams
# (Envoy's default is 2**31 - 1).
MAX_STREAMS_PER_CONNECTION = 1000


def tenant_share(fraction: float, total: int) -> int:
    """How many of `total` slots one tenant may hold with a `fraction` (0 < fraction <= 1) of them.

    Rounded up (half of 3 workers is 2), at least one, at most `total`.
    """
    # The epsilon keeps 0.1 * 10 (1.0000000000000002 in floats) at 1.
    return max(1, min(total, math.ceil(fraction * total - 1e-9)))
