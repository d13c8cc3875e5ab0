"""The clients the compatibility tests call the shared stack (a real `flowport up` with Envoy) with."""

from __future__ import annotations

import httpx
import pytest

from ..conftest import ADMIN_HEADERS, Stack


@pytest.fixture
def http(stack: Stack) -> httpx.Client:
    """REST through Envoy with the admin key (60 s: the seed's workflows wait for their runs)."""
    return httpx.Client(base_url=stack.http, timeout=60, headers=ADMIN_HEADERS)


@pytest.fixture
def anonymous(stack: Stack) -> httpx.Client:
    """REST through Envoy with no credential, as a browser or a Kailash client without a token."""
    return httpx.Client(base_url=stack.http, timeout=30)
