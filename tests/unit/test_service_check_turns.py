"""Registered services' health checks take turns by tenant: one tenant's endpoints that never answer
hold up only its own checks, and what a sweep leaves of them is checked first in the next."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from flowport.server.clock import now_us
from flowport.server.service_checks import PER_TENANT, HealthChecker
from flowport.server.storage import SqliteStore
from flowport.v1 import registry_pb2

pytestmark = pytest.mark.timeout(60)

NOISY_SERVICES = 40
# Each sweep lasts about this long (the black hole's checks run into it). The healthy endpoint must
# answer within it on a loaded two-core machine: at 0.3 s one check once took 318 ms.
TIMEOUT = 2.0


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def healthy_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def black_hole_port() -> AsyncIterator[int]:
    """Accepts connections and never answers: every check against it runs into its timeout."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_tenant_of_black_holed_endpoints_spends_only_its_own_turns(
    tmp_path: Path, healthy_port: int, black_hole_port: int
) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        for n in range(NOISY_SERVICES):
            service = registry_pb2.RegisteredService(
                service_id=f"hole-{n:02d}", endpoint=f"http://127.0.0.1:{black_hole_port}", health_path="/health"
            )
            await store.register_service("noisy", service, None, now_us())
        quiet = registry_pb2.RegisteredService(
            service_id="fine", endpoint=f"http://127.0.0.1:{healthy_port}", health_path="/health"
        )
        await store.register_service("quiet", quiet, None, now_us())

        async with httpx.AsyncClient() as http:
            checker = HealthChecker(store, http, frozenset({"127.0.0.1"}), interval=TIMEOUT, timeout=TIMEOUT)
            first = await checker.check_all()
            checked_once = {
                s.service_id for _, s in await store.services_to_check(now_us()) if s.check_time.ToMicroseconds()
            }
            second = await checker.check_all()
            checked_twice = {
                s.service_id for _, s in await store.services_to_check(now_us()) if s.check_time.ToMicroseconds()
            }

        fine = await store.get_service("quiet", "fine", now_us())
        assert fine is not None and fine.status == registry_pb2.RegisteredService.STATUS_HEALTHY
        # Every noisy check outlasts the sweep's window, so each of its lanes makes one.
        assert first == PER_TENANT + 1, first
        assert checked_once - {"fine"} == {f"hole-{n:02d}" for n in range(PER_TENANT)}
        # The next sweep starts with the ones never checked, not the same four again.
        assert second == PER_TENANT + 1, second
        assert checked_twice - {"fine"} == {f"hole-{n:02d}" for n in range(2 * PER_TENANT)}
        assert checker.last_sweep is not None
        assert (checker.last_sweep.checked, checker.last_sweep.failed) == (PER_TENANT + 1, PER_TENANT)
    finally:
        await store.close()


async def test_a_sweep_with_more_lanes_than_places_checks_each_due_service_once(
    tmp_path: Path, healthy_port: int
) -> None:
    """Eight tenants of five services: 32 lanes wait for 16 places, and each tenant's lanes share
    one queue; every service is checked once, none twice, and the sweep ends."""
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        for t in range(8):
            for n in range(5):
                service = registry_pb2.RegisteredService(
                    service_id=f"s{n}", endpoint=f"http://127.0.0.1:{healthy_port}", health_path="/health"
                )
                await store.register_service(f"tenant-{t}", service, None, now_us())
        async with httpx.AsyncClient() as http:
            checker = HealthChecker(store, http, frozenset({"127.0.0.1"}), interval=30.0, timeout=5.0)
            assert await checker.check_all() == 40
        checked = [s for _, s in await store.services_to_check(now_us())]
        assert all(s.status == registry_pb2.RegisteredService.STATUS_HEALTHY for s in checked)
        assert checker.last_sweep is not None and (checker.last_sweep.checked, checker.last_sweep.failed) == (40, 0)
    finally:
        await store.close()
