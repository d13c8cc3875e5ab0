"""JSON parsed with the cyclic collector paused: no collection runs during a parse, and the
collector is as it was after one, a failed one included."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from flowport.server import json_parse


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that run while the test does."""
    ran: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            ran.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield ran
    finally:
        gc.callbacks.remove(note)
        gc.enable()


@pytest.mark.parametrize("loads", [json_parse.loads, json_parse.loads_python])
def test_no_collection_runs_during_a_parse(loads: Any, collections: list[int]) -> None:
    text = "[" + ",".join(["[]"] * 100_000) + "]"  # 100,000 lists: about 140 collections unpaused
    assert len(loads(text)) == 100_000
    assert collections == []
    assert gc.isenabled()


def test_the_collector_is_left_as_it_was(collections: list[int]) -> None:
    with pytest.raises(ValueError):
        json_parse.loads(b"[1, 2")
    assert gc.isenabled()
    with pytest.raises(ValueError):
        json_parse.loads_python("{")
    assert gc.isenabled()
    gc.disable()
    assert json_parse.loads(b"[1]") == [1]
    assert not gc.isenabled(), "a collector turned off elsewhere stays off"
    assert json_parse.loads_python("NaN") != json_parse.loads_python("NaN"), "Python's json reads NaN"
