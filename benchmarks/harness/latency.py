"""One load run's outcome: throughput, latency percentiles, errors, and a CDF to plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (0.5, 0.9, 0.99)
CDF_POINTS = 100


def percentile(ordered: Sequence[float], q: float) -> float:
    """The value at fraction q of an ascending sequence (nearest rank); 0 when empty."""
    if not ordered:
        return 0.0
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


@dataclass
class LoadResult:
    """What a load generator measured. Latencies in milliseconds."""

    tool: str
    requests: int
    seconds: float
    errors: int = 0
    # Answers that arrived but were wrong (the scenario checks each one it can).
    incorrect: int = 0
    concurrency: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    # (latency ms, fraction of requests at or below it), for the CDF plots.
    cdf: list[tuple[float, float]] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_second": round(self.per_second, 1)}

    @classmethod
    def from_latencies(
        cls, tool: str, latencies_ms: list[float], seconds: float, *, errors: int, incorrect: int, concurrency: int
    ) -> LoadResult:
        ordered = sorted(latencies_ms)
        cdf = (
            [(round(percentile(ordered, i / CDF_POINTS), 3), i / CDF_POINTS) for i in range(1, CDF_POINTS)]
            + [(round(ordered[-1], 3), 1.0)]
            if ordered
            else []
        )
        return cls(
            tool,
            len(ordered),
            seconds,
            errors,
            incorrect,
            concurrency,
            *(round(percentile(ordered, q), 3) for q in PERCENTILES),
            round(ordered[-1], 3) if ordered else 0.0,
            cdf,
        )
