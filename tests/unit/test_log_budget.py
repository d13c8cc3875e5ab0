"""Egress log lines are held to a budget per tenant a minute; what was held back is said with the
next line written."""

from __future__ import annotations

import logging

import pytest

from flowport.server import egress
from flowport.server.egress import TargetRefused, log_refusal
from flowport.server.observability.log_budget import LogBudget


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_key_writes_its_budget_a_minute_and_hears_of_what_was_held_back() -> None:
    clock = _Clock()
    budget = LogBudget(per_minute=3, clock=clock)
    assert [budget.admit("noisy") for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert budget.admit("quiet") == (True, 0), "another tenant's lines are its own"
    clock.now += 59.0
    assert budget.admit("noisy") == (False, 0)
    clock.now += 1.0
    assert budget.admit("noisy") == (True, 3), "the next minute's first line says how many were held"
    assert budget.admit("noisy") == (True, 0)


def test_a_tenant_refused_in_a_loop_writes_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    refused = TargetRefused("10.0.0.1", "10.0.0.1")
    with caplog.at_level(logging.INFO, logger=egress.__name__):
        for _ in range(egress.LOG_LINES_PER_MINUTE + 40):
            log_refusal(refused, "GET http://10.0.0.1/", tenant="noisy")
        log_refusal(refused, "GET http://10.0.0.1/", tenant="quiet")
    lines = [r.getMessage() for r in caplog.records if r.name == egress.__name__]
    assert len([line for line in lines if "tenant noisy" in line]) == egress.LOG_LINES_PER_MINUTE
    assert len([line for line in lines if "tenant quiet" in line]) == 1
