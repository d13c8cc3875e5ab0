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
import functools
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any

from flowport.server.tenant_shares import TenantShares

THREADS = 32
TENANT_SHARE = 8
# The tenant a lookup is made for, set by whoever acts for one (a node, a webhook delivery, a
# service check); "" is the server itself.
RESOLVING_FOR: ContextVar[str] = ContextVar("resolving_for", default="")

AddressInfo = list[tuple[Any, ...]]


class _Threads:
    """Daemon threads taking lookups from a queue, started as needed up to `count`.

    Not a ThreadPoolExecutor: the interpreter joins its threads at exit, and a
    lookup the resolver never answers would hold up the server's stop.
    """

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._count = count
        self._started = 0
        self._lock = threading.Lock()

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, call))
        with self._lock:
            if self._started < self._count:
                self._started += 1
                threading.Thread(target=self._work, name="resolver", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            future, call = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)


_threads = _Threads(THREADS)
_shares = TenantShares(TENANT_SHARE)


async def getaddrinfo(host: str, port: int) -> AddressInfo:
    """socket.getaddrinfo for a stream connection to `host`:`port`, in the resolver's threads."""
    tenant = RESOLVING_FOR.get()
    if tenant:
        await _shares.acquire(tenant)
    lookup = asyncio.wrap_future(
        _threads.submit(functools.partial(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM))
    )

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
