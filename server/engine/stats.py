"""Execution counters and a latency window for GatewayService.GetStats."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class ExecutionCounters:
    """Counts since start, and the latencies of the most recent executions."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    queued: int = 0
    taken_from_queue: int = 0
    queue_failures: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def percentile(self, fraction: float) -> float:
        """Latency at `fraction` (0..1) of the recent window, in ms; 0 when empty."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
