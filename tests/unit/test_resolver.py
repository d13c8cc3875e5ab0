"""Name lookups for tenants: a tenant whose names never resolve holds at most its share of the
resolver's threads, counted until each thread is done, and other tenants' lookups go on."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from flowport.server import resolver
from flowport.server.egress import resolve_host

pytestmark = pytest.mark.timeout(60)


async def test_a_tenants_hanging_lookups_hold_only_its_share_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = threading.Event()
    real = socket.getaddrinfo

    def lookup(host: str, *args: Any) -> Any:
        if host.endswith(".never.example"):
            answer.wait(30)  # a resolver that does not reply: the thread blocks whatever the caller does
            raise socket.gaierror(socket.EAI_AGAIN, "no answer")
        return real("127.0.0.1", *args)  # stands in for a public name, without the network

    monkeypatch.setattr(socket, "getaddrinfo", lookup)

    async def as_tenant(tenant: str, host: str, timeout: float) -> Any:
        resolver.RESOLVING_FOR.set(tenant)
        async with asyncio.timeout(timeout):
            return await resolver.getaddrinfo(host, 443)

    try:
        # The noisy tenant's callers give up after a moment; their threads stay blocked.
        noisy = [asyncio.create_task(as_tenant("noisy", f"h{n}.never.example", 0.2)) for n in range(20)]
        outcomes = await asyncio.gather(*noisy, return_exceptions=True)
        assert all(isinstance(o, TimeoutError) for o in outcomes)
        assert resolver.held("noisy") == resolver.TENANT_SHARE  # counted until the threads are done
        # Another tenant's lookup gets a thread at once.
        quiet = await as_tenant("quiet", "api.example.com", 10)
        assert quiet and quiet[0][4][0] == "127.0.0.1"
        assert resolver.held("quiet") == 0
    finally:
        answer.set()
    for _ in range(200):
        if resolver.held("noisy") == 0:
            break
        await asyncio.sleep(0.02)
    assert resolver.held("noisy") == 0, "every place comes back once the threads are done"


async def test_the_ssrf_check_resolves_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def lookup(host: str, *args: Any) -> Any:
        seen.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    with pytest.raises(Exception, match="internal address"):
        await resolve_host("inside.example", 443, frozenset())
    assert seen == ["inside.example"]


async def test_its_threads_never_hold_up_the_process_exit() -> None:
    # A ThreadPoolExecutor's threads are joined at exit: one blocked on a resolver that never
    # answers would hold up the server's stop.
    await resolver.getaddrinfo("127.0.0.1", 80)
    threads = [t for t in threading.enumerate() if t.name == "resolver"]
    assert threads and all(t.daemon for t in threads)


async def test_resource_pool_pings_look_up_as_their_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from flowport.server.resources import pool_checks

    class Pools:
        def resource_pools(self) -> list[tuple[str, str, str, object]]:
            return [("acme", "db", "f1", "engine-a"), ("globex", "db", "f2", "engine-g")]

        def is_current(self, engine: object) -> bool:
            return True

        @contextlib.asynccontextmanager
        async def using(self, engine: object) -> Any:
            yield

    class Directory:
        async def still_current(self, tenant: str, name: str, fingerprint: str) -> bool:
            return True

    seen: dict[object, str] = {}

    async def ping(engine: object, timeout: float) -> float:
        seen[engine] = resolver.RESOLVING_FOR.get()  # what a new connection's lookup would count against
        return 1.0

    monkeypatch.setattr(pool_checks, "ping", ping)
    health = pool_checks.PoolHealth(Pools(), Directory(), interval=60, timeout=1)  # type: ignore[arg-type]
    sweep = await health.check_all()
    assert sweep.checked == 2 and seen == {"engine-a": "acme", "engine-g": "globex"}
    assert resolver.RESOLVING_FOR.get() == "", "the sweep itself stays the server's"
