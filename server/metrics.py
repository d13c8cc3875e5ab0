"""In-process call figures behind GatewayService.GetStats: the whole process's and each tenant's.

Latency percentiles come from a fixed histogram with buckets 5% apart
(0.01 ms to ~100 s): recording is an index computation and an increment,
memory is constant, and a percentile is off by at most one bucket (5%).
Prometheus keeps its own histograms (server/observability/prometheus.py);
these exist so GetStats can answer per tenant without a metrics backend.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

TRANSPORTS: Final = ("grpc", "sse", "ndjson", "websocket")
_GROWTH: Final = 1.05
_SMALLEST: Final = 1e-5  # seconds: the first bucket holds everything up to 0.01 ms
_BUCKETS: Final = 330  # 1e-5 * 1.05**330 is about 100 s; slower calls share the last bucket
_LOG_GROWTH: Final = math.log(_GROWTH)


class LatencyHistogram:
    """Counts of durations in log-spaced buckets."""

    __slots__ = ("count", "counts")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0

    def record(self, seconds: float) -> None:
        index = 0 if seconds <= _SMALLEST else min(_BUCKETS - 1, 1 + int(math.log(seconds / _SMALLEST) / _LOG_GROWTH))
        self.counts[index] += 1
        self.count += 1

    def percentile_ms(self, fraction: float) -> float:
        """The upper bound of the bucket holding the `fraction` quantile, in ms; 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return round(1000 * _SMALLEST * _GROWTH**index, 4)
        return round(1000 * _SMALLEST * _GROWTH ** (_BUCKETS - 1), 4)


@dataclass
class CallFigures:
    """Calls of one scope (the process, or one tenant)."""

    total: int = 0
    errors: int = 0
    unary_seconds: float = 0.0
    unary_calls: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    streams: Counter[str] = field(default_factory=Counter)

    @property
    def active_streams(self) -> int:
        return sum(self.streams.values())

    @property
    def error_rate(self) -> float:
        """errors / total, or 0 before the first call."""
        return self.errors / self.total if self.total else 0.0

    @property
    def avg_response_ms(self) -> float:
        """Mean unary handling time in milliseconds."""
        return 1000.0 * self.unary_seconds / self.unary_calls if self.unary_calls else 0.0

    def _unary(self, seconds: float, ok: bool) -> None:
        self.total += 1
        self.unary_calls += 1
        self.unary_seconds += seconds
        self.latency.record(seconds)
        if not ok:
            self.errors += 1


@dataclass
class RequestMetrics(CallFigures):
    """The process's call figures, updated by the interceptor on every call, and each tenant's."""

    started: float = field(default_factory=time.time)
    tenants: dict[str, CallFigures] = field(default_factory=dict)

    def tenant(self, tenant: str) -> CallFigures:
        """`tenant`'s figures (empty ones for a tenant not seen yet)."""
        figures = self.tenants.get(tenant)
        if figures is None:
            figures = self.tenants[tenant] = CallFigures()
        return figures

    def record(self, seconds: float, ok: bool, tenant: str | None = None) -> None:
        """Count one finished unary call (of `tenant` when the caller was authenticated)."""
        self._unary(seconds, ok)
        if tenant is not None:
            self.tenant(tenant)._unary(seconds, ok)

    def stream_opened(self, transport: str = "grpc") -> None:
        """Count a server stream that started (its tenant is counted once known: `stream_tenant`)."""
        self.total += 1
        self.streams[transport] += 1

    def stream_tenant(self, tenant: str, transport: str) -> None:
        """The stream opened with `transport` belongs to `tenant`."""
        figures = self.tenant(tenant)
        figures.total += 1
        figures.streams[transport] += 1

    def stream_closed(self, ok: bool, transport: str = "grpc", tenant: str | None = None) -> None:
        """Count a server stream that ended."""
        self.streams[transport] -= 1
        if not ok:
            self.errors += 1
        if tenant is not None:
            figures = self.tenant(tenant)
            figures.streams[transport] -= 1
            if not ok:
                figures.errors += 1

    @property
    def uptime(self) -> int:
        """Whole seconds since the process started serving."""
        return int(time.time() - self.started)
