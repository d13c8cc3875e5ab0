"""Limits the API promises, in a module light enough for the Envoy config
renderer (`flowport up`'s supervisor) to import without the server."""

from __future__ import annotations

import math

# The longest a CreateExecution may wait for its execution to end (wait_timeout),
# in seconds; Envoy's route for it must outlast this.
MAX_WAIT = 300.0


def tenant_share(fraction: float, total: int) -> int:
    """How many of `total` slots one tenant may hold with a `fraction` (0 < fraction <= 1) of them.

    Rounded up (half of 3 workers is 2), at least one, at most `total`.
    """
    # The epsilon keeps 0.1 * 10 (1.0000000000000002 in floats) at 1.
    return max(1, min(total, math.ceil(fraction * total - 1e-9)))
