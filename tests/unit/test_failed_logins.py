"""The slow-down after repeated failed authentications from one client: free up to the
allowed count per window, then doubling delays up to a cap; other clients unaffected."""

from __future__ import annotations

import pytest

from flowport.server.auth import authenticator
from flowport.server.auth.authenticator import MAX_DELAY, _Failures


def test_failures_beyond_the_allowed_count_are_stalled_longer_and_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(authenticator.time, "monotonic", lambda: now[0])
    failures = _Failures(3)
    assert [failures.record("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    stalls = [failures.record("10.0.0.1") for _ in range(12)]
    assert stalls[:3] == [0.5, 1.0, 2.0] and stalls == sorted(stalls) and stalls[-1] == MAX_DELAY
    assert failures.record("10.0.0.2") == 0.0  # another client is not slowed by the first
    now[0] += authenticator.FAILURE_WINDOW + 1  # old failures leave the window
    assert failures.record("10.0.0.1") == 0.0
