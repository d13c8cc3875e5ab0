"""A PostgreSQL server that drops the gateway's connections (a restart, a failover, an operator's
pg_terminate_backend) costs calls made while it cannot be reached, as UNAVAILABLE (retryable,
reason STORE_UNAVAILABLE), never INTERNAL, and the server recovers on its own when the database
takes connections again: no restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import start, stop
from flowport.v1 import gateway_pb2, session_pb2
from tests.backends import PostgresServer

from ..conftest import ADMIN_KEY, make_settings


def _cut(server: PostgresServer, database: str, *, allow: bool) -> None:
    """Refuse (or allow again) new connections to `database`, and drop the ones it has."""
    server.sql(f"ALTER DATABASE {database} ALLOW_CONNECTIONS {'true' if allow else 'false'}", database="postgres")
    if not allow:
        server.sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'",  # noqa: S608 - a name the test made
            database="postgres",
        )


@pytest.mark.timeout(120)
async def test_dropped_connections_are_unavailable_then_made_again(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    running = await start(make_settings(tmp_path / "data", database_url=postgres_url))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY, retries=1) as client:
            made = await client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
            ask = session_pb2.GetSessionRequest(session_id=made.session_id)
            _cut(postgres_server, database, allow=False)
            try:
                for call in (
                    client.sessions.GetSession(ask),
                    client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session())),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    error = ApiError.from_rpc_error(caught.value)
                    assert error.code() is grpc.StatusCode.UNAVAILABLE and error.reason == "STORE_UNAVAILABLE", error
                    assert error.retry_delay is not None
                health = await client.gateway.GetHealth(gateway_pb2.GetHealthRequest())
                assert health.components["database"].status == "unhealthy"
            finally:
                _cut(postgres_server, database, allow=True)
            # Back on its own, within a second or two (a connection that failed to connect is tried
            # again a second later; until then its calls fail at once, UNAVAILABLE as above).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                try:
                    read = await client.sessions.GetSession(ask)
                    await client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
                    health = await client.gateway.GetHealth(gateway_pb2.GetHealthRequest())
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                else:
                    if health.components["database"].status == "healthy":
                        break
                assert loop.time() < deadline, "the server never recovered with its database"
                await asyncio.sleep(0.2)
            assert read.session_id == made.session_id
    finally:
        await stop(running, 2.0)


async def test_a_database_that_is_not_there_at_start_is_one_line_naming_it() -> None:
    from flowport.server.storage import MigrationError
    from flowport.server.storage.postgres import PostgresStore

    from ..conftest import free_port

    url = f"postgresql://flowport:hunter2secret@127.0.0.1:{free_port()}/flowport"
    with pytest.raises(MigrationError) as caught:
        await PostgresStore.open(url)
    said = str(caught.value)
    assert said.startswith(f"cannot connect to postgresql://flowport@127.0.0.1:{url.split(':')[3]}")
    assert "(--database-url)" in said and "refused" in said.lower()
    assert "hunter2secret" not in said and "\n" not in said
    assert caught.value.__cause__ is None and caught.value.__suppress_context__, "no driver traceback behind it"
