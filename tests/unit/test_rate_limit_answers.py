"""What flowport's rate limit service tells Envoy (server/ratelimit/service.py), from which Envoy
makes a 429's headers: the limit with its window's unit (none for a window that has no unit),
the time to the window's end, and a retry-after on a refusal."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from flowport.server.ratelimit import wire
from flowport.server.ratelimit.service import RateLimitService


class _Counters:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def hit(self, key: str, addend: int, window: float) -> int:
        self.counts[key] = self.counts.get(key, 0) + addend
        return self.counts[key]


class _Keys:
    async def verify(self, key: str) -> Any:
        return SimpleNamespace(tenant="acme")


def _request() -> Any:
    request = wire.RateLimitRequest(domain="flowport")
    request.descriptors.add().entries.add(key="api_key", value="fpk_x")
    return request


@pytest.mark.parametrize(("window", "unit"), [(60.0, 2), (3600.0, 3), (10.0, 0), (1.5, 0)])
async def test_answers_carry_the_limit_its_unit_and_the_time_to_the_windows_end(window: float, unit: int) -> None:
    service = RateLimitService(_Counters(), _Keys(), None, limit=2, window=window, fail_open=True)  # type: ignore[arg-type]
    answers = [await service.ShouldRateLimit(_request(), None) for _ in range(3)]  # type: ignore[arg-type]
    left = window - time.time() % window
    assert [a.overall_code for a in answers] == [wire.OK, wire.OK, wire.OVER_LIMIT]
    for answer in answers:
        [status] = answer.statuses
        assert status.current_limit.requests_per_unit == 2 and status.current_limit.unit == unit
        assert 0 < status.duration_until_reset.seconds <= int(left) + 1
    assert [(h.key, h.value) for h in answers[2].response_headers_to_add] == [
        ("retry-after", str(answers[2].statuses[0].duration_until_reset.seconds))
    ]
    assert not answers[0].response_headers_to_add, "only a refusal says when to retry"
