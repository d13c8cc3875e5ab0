"""Name lookups for user-given targets, shared fairly between tenants.

A lookup blocks a thread until the resolver answers, which a name under a
zone whose servers never reply delays for the resolver's whole timeout (ten
seconds and more), whatever the caller's own deadline: a cancelled caller
leaves its thread blocked. uvloop resolves on libuv's pool of four threads,
which the server's own connections share too, so a tenant with such names
could hold them all. Here lookups run in a pool of their own, and a tenant
holds at most TENANT_SHARE of its threads, counted until each thread
returns, not until its caller gives up. Lookups made for no tenant (the
server's own) are not capped.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

from flowport.server.tenant_shares import TenantShares

THREADS = 32
TENANT_SHARE = 8
# The tenant a lookup is made for, set by whoever acts for one (a node, a webhook delivery, a
# service check); "" is the server itself.
RESOLVING_FOR: ContextVar[str] = ContextVar("resolving_for", default="")

_pool: ThreadPoolExecutor | None = None
_shares = TenantShares(TENANT_SHARE)

AddressInfo = list[tuple[Any, ...]]


def _threads() -> ThreadPoolExecutor:
    global _pool  # noqa: PLW0603 - one pool per process, made at first use
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="resolver")
    return _pool


async def getaddrinfo(host: str, port: int) -> AddressInfo:
    """socket.getaddrinfo for a stream connection to `host`:`port`, in the resolver's threads."""
    tenant = RESOLVING_FOR.get()
    if tenant:
        await _shares.acquire(tenant)
    loop = asyncio.get_running_loop()
    lookup = loop.run_in_executor(_threads(), socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)

    def done(finished: asyncio.Future[Any]) -> None:
        if tenant:
            _shares.release(tenant)  # when the thread is done, even if the caller stopped waiting
        if not finished.cancelled():
            finished.exception()  # read: a lookup nobody waits for any more fails quietly

    lookup.add_done_callback(done)
    # A caller that gives up (its deadline) leaves the lookup to finish on its own.
    return list(await asyncio.shield(lookup))


def held(tenant: str) -> int:
    """Lookups of `tenant` still running (for tests and diagnostics)."""
    return _shares.held(tenant)
