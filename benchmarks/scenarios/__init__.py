"""The scenarios `python -m benchmarks run` measures, each with its baseline in the same run.

A scenario takes a Context (sizes, a scratch folder) and returns a JSON-ready
dict: its measurements, the ratios the targets are about, and `checks`
(what it verified about the answers). It raises when an answer is wrong, so
a fast wrong result can never pass for a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sizes:
    """How much load each scenario applies."""

    name: str
    unary_requests: int  # per h2load / grpc.aio run of the unary scenarios
    seconds: float  # per duration-bounded run (executions)
    concurrencies: tuple[int, ...]  # the throughput-vs-concurrency sweep
    events: int  # events published in the fan-out and webhook scenarios
    subscribers: int
    memory_requests: int
    idle_streams: int
    startups: int
    scale_out_seconds: float


SIZES = {
    # In the test suite: every scenario runs and is checked, at a few hundred requests.
    "smoke": Sizes("smoke", 300, 1.0, (4, 32), 20, 4, 500, 10, 1, 1.0),
    # The CI-sized run: under three minutes.
    "quick": Sizes("quick", 5_000, 3.0, (1, 8, 32), 200, 10, 20_000, 50, 2, 2.0),
    # The figures for RESULTS.md.
    "full": Sizes("full", 50_000, 10.0, (1, 4, 8, 16, 32, 64), 2_000, 50, 100_000, 200, 5, 10.0),
}


@dataclass
class Context:
    sizes: Sizes
    scratch: Path
    kailash_python: Path | None = None

    def folder(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class WrongAnswer(AssertionError):
    """A scenario's answers were not what the call should return."""


def check(condition: bool, what: str) -> str:
    """Raise WrongAnswer unless `condition`; returns `what` for the scenario's list of checks."""
    if not condition:
        raise WrongAnswer(what)
    return what


Result = dict[str, Any]
