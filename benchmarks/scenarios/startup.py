"""Start-up: `flowport up` launched until `/health` answers 200 through Envoy (and the
server reports SERVING), on a fresh data folder and again on the same folder."""

from __future__ import annotations

from statistics import median

from benchmarks.harness.targets import FlowportUp
from benchmarks.scenarios import Context, Result, check


def run(ctx: Context) -> Result:
    fresh: list[float] = []
    again: list[float] = []
    for attempt in range(ctx.sizes.startups):
        folder = ctx.folder(f"startup-{attempt}")
        for times in (fresh, again):  # the first start makes the database and keys; the second reuses them
            with FlowportUp.run(folder) as up:
                times.append(up.startup_seconds)
    return {
        "fresh_seconds": [round(t, 3) for t in fresh],
        "existing_data_seconds": [round(t, 3) for t in again],
        "median_fresh_seconds": round(median(fresh), 3),
        "median_existing_data_seconds": round(median(again), 3),
        "checks": [check(len(fresh) == len(again) == ctx.sizes.startups, "every start reached healthy")],
    }
