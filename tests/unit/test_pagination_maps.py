"""Kailash's maps keyed by id (GET /workflows, GET /durability/requests): bounded as a page is."""

from __future__ import annotations

import pytest

from flowport.server import pagination
from flowport.server.limits import MAX_PAGE_BYTES


@pytest.mark.timeout(30)
def test_a_map_holds_the_first_entries_up_to_the_page_size() -> None:
    entries = ((f"id{n:05}", {"n": n}) for n in range(pagination.MAX_PAGE_SIZE + 5))
    answer = pagination.bounded_map(entries)
    assert len(answer) == pagination.MAX_PAGE_SIZE
    assert sorted(answer.keys()) == [f"id{n:05}" for n in range(pagination.MAX_PAGE_SIZE)]
    assert answer["id00999"]["n"] == 999


@pytest.mark.timeout(30)
def test_a_map_stops_before_a_page_of_bytes_but_always_holds_one() -> None:
    big = "x" * (MAX_PAGE_BYTES // 3)
    answer = pagination.bounded_map((f"id{n}", {"description": big}) for n in range(10))
    assert sorted(answer.keys()) == ["id0", "id1"]
    huge = pagination.bounded_map([("only", {"description": "y" * (MAX_PAGE_BYTES + 1)})])
    assert list(huge.keys()) == ["only"]
    assert len(pagination.bounded_map([])) == 0
