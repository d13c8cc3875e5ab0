"""In-process counters behind GatewayService.GetStats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Call counters, updated by the interceptor on every call."""

    total: int = 0
    errors: int = 0
    unary_seconds: float = 0.0
    unary_calls: int = 0
    active_streams: int = 0
    started: float = field(default_factory=time.time)

    def record(self, seconds: float, ok: bool) -> None:
        """Count one finished unary call."""
        self.total += 1
        self.unary_calls += 1
        self.unary_seconds += seconds
        if not ok:
            self.errors += 1

    def stream_opened(self) -> None:
        """Count a server stream that started."""
        self.total += 1
        self.active_streams += 1

    def stream_closed(self, ok: bool) -> None:
        """Count a server stream that ended."""
        self.active_streams -= 1
        if not ok:
            self.errors += 1

    @property
    def error_rate(self) -> float:
        """errors / total, or 0 before the first call."""
        return self.errors / self.total if self.total else 0.0

    @property
    def avg_response_ms(self) -> float:
        """Mean unary handling time in milliseconds."""
        return 1000.0 * self.unary_seconds / self.unary_calls if self.unary_calls else 0.0

    @property
    def uptime(self) -> int:
        """Whole seconds since the process started serving."""
        return int(time.time() - self.started)
