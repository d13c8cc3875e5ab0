"""Limits the API promises, in a module light enough for the Envoy config
renderer (`flowport up`'s supervisor) to import without the server."""

from __future__ import annotations

# The longest a CreateExecution may wait for its execution to end (wait_timeout),
# in seconds; Envoy's route for it must outlast this.
MAX_WAIT = 300.0
