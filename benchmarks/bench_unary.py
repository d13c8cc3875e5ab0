"""GetSession over gRPC against a bare grpc.aio server returning the same
message, measured in the same run, so their ratio is flowport's overhead
above plain Python gRPC on this machine."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from flowport.server.app import Running, start, stop
from flowport.server.settings import Settings
from flowport.v1 import session_pb2, session_pb2_grpc

CALLS = 200  # per benchmark round: one round is 200 sequential unary calls
# Every call authenticates, as in production; the bare server gets the same header.
KEY = "fpk_bench." + secrets.token_urlsafe(32)
METADATA = (("x-api-key", KEY),)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Echo(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, reply: session_pb2.Session) -> None:
        self.reply = reply

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: Any) -> session_pb2.Session:
        return self.reply


@pytest.fixture
def flowport(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Iterator[tuple[Running, session_pb2.Session]]:
    """The server as configured by default (Prometheus metrics on)."""
    yield from _flowport(loop, tmp_path, _port())


@pytest.fixture
def flowport_without_metrics(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> Iterator[tuple[Running, session_pb2.Session]]:
    """--metrics-port 0: what Prometheus counting costs a call, beside the default."""
    yield from _flowport(loop, tmp_path, 0)


def _flowport(
    loop: asyncio.AbstractEventLoop, tmp_path: Path, metrics_port: int
) -> Iterator[tuple[Running, session_pb2.Session]]:
    settings = Settings.load(
        {"data_dir": tmp_path, "grpc_port": _port(), "metrics_port": metrics_port, "admin_api_key": KEY}, environ={}
    )
    running = loop.run_until_complete(start(settings))

    async def create() -> session_pb2.Session:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = session_pb2_grpc.SessionServiceStub(ch)
            request = session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="bench"))
            return await stub.CreateSession(request, metadata=METADATA)

    yield running, loop.run_until_complete(create())
    loop.run_until_complete(stop(running, 1.0))


def _rounds(loop: asyncio.AbstractEventLoop, target: str, session_id: str) -> Any:
    async def go() -> session_pb2.Session:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = session_pb2_grpc.SessionServiceStub(ch)
            request = session_pb2.GetSessionRequest(session_id=session_id)
            reply = session_pb2.Session()
            for _ in range(CALLS):
                reply = await stub.GetSession(request, metadata=METADATA)
            return reply

    return lambda: loop.run_until_complete(go())


def test_get_session_flowport(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, flowport: tuple[Running, session_pb2.Session]
) -> None:
    running, session = flowport
    reply = benchmark(_rounds(loop, f"127.0.0.1:{running.port}", session.session_id))
    assert reply.session_id == session.session_id


def test_get_session_flowport_without_metrics(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    flowport_without_metrics: tuple[Running, session_pb2.Session],
) -> None:
    running, session = flowport_without_metrics
    reply = benchmark(_rounds(loop, f"127.0.0.1:{running.port}", session.session_id))
    assert reply.session_id == session.session_id


def test_get_session_bare_grpc_aio(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, flowport: tuple[Running, session_pb2.Session]
) -> None:
    _, session = flowport

    async def serve() -> tuple[grpc.aio.Server, int]:
        # Created inside the loop: a grpc.aio server belongs to the loop it starts on.
        server = grpc.aio.server()
        session_pb2_grpc.add_SessionServiceServicer_to_server(_Echo(session), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run_until_complete(serve())
    try:
        reply = benchmark(_rounds(loop, f"127.0.0.1:{port}", session.session_id))
    finally:
        loop.run_until_complete(server.stop(None))
    assert reply.session_id == session.session_id
