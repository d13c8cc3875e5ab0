"""Component health checks behind GatewayService.GetHealth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one component check."""

    status: str
    latency_ms: float
    checked_at: float
    message: str = ""


Check = Callable[[], Awaitable[None]]


async def run_check(check: Check, limit: float) -> CheckResult:
    """Run one check: healthy if it returns within `limit` seconds, else unhealthy."""
    started, wall = time.perf_counter(), time.time()
    try:
        await asyncio.wait_for(check(), limit)
    except TimeoutError:
        return CheckResult(UNHEALTHY, 1000 * (time.perf_counter() - started), wall, f"no answer within {limit:g}s")
    except Exception as exc:  # noqa: BLE001 - any failure is the component's health
        return CheckResult(UNHEALTHY, 1000 * (time.perf_counter() - started), wall, f"{type(exc).__name__}: {exc}")
    return CheckResult(HEALTHY, 1000 * (time.perf_counter() - started), wall)


def overall(statuses: list[str]) -> str:
    """The worst of the component statuses (healthy when there are none)."""
    return max(statuses, key=_RANK.__getitem__, default=HEALTHY)
