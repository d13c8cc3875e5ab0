"""Benchmarks drive asyncio code from pytest-benchmark's synchronous timer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh event loop, closed after the benchmark."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()
