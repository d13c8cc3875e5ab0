"""Type aliases shared by the service implementations."""

from __future__ import annotations

from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
"""The context every grpc.aio handler receives."""
