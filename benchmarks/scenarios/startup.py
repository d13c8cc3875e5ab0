"""Start-up: `flowport up` launched until `/health` answers 200 through Envoy (and the
server reports SERVING), on a fresh data folder and again on the same folder.

Measured as an installed flowport starts: with Python's bytecode cache written
(PYTHONDONTWRITEBYTECODE, which some environments set, is dropped for these
runs, and one uncounted start writes the cache first)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from statistics import median

from benchmarks.harness.targets import FlowportUp
from benchmarks.scenarios import Context, Result, check


@contextlib.contextmanager
def _bytecode_cached() -> Iterator[None]:
    saved = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PYTHONDONTWRITEBYTECODE"] = saved


def run(ctx: Context) -> Result:
    fresh: list[float] = []
    again: list[float] = []
    with _bytecode_cached():
        with FlowportUp.run(ctx.folder("startup-warm-up")):
            pass
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
