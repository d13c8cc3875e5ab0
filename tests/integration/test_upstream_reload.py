"""Envoy's servers changed while it runs (issue 21): `flowport up --no-local-server` in front of
`flowport serve` on 127.0.0.2 and 127.0.0.3 (PostgreSQL and Redis shared), under REST and gRPC
load. `flowport upstreams add` brings in 127.0.0.4, `remove` takes 127.0.0.2 out, which is then
stopped (SIGTERM: it drains). Envoy is the same process throughout, no call fails, each request id
makes one execution that succeeds, the server added takes calls, and event streams opened before
the changes stay open across them: on a server that stays, to the end; on the one removed, until
that server's own drain ends it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowport.clients import Client
from flowport.server.shutdown import DEFAULT_DRAIN
from flowport.v1 import apikey_pb2, event_pb2, gateway_pb2

from ..backends import free_port
from ..conftest import ADMIN_KEY, ServeProcess, Stack, make_settings, start_up, stop_up
from .test_rolling_restart import (
    HOSTS,
    TYPES,
    Load,
    _each_ran_once,
    _grpc_worker,
    _hosts_healthy,
    _logged,
    _prepare,
    _rest_worker,
    shared_servers,
)

pytestmark = pytest.mark.integration

KEPT, REMOVED, ADDED = HOSTS[1], HOSTS[0], HOSTS[2]
MAX_HELD = 8  # streams opened, at most, until each first server holds one


@dataclass
class Held:
    """One event stream through Envoy, read as it comes, never resumed: whatever ends it shows."""

    events: list[dict[str, Any]] = field(default_factory=list)
    received: int = 0  # messages: events, and heartbeats (sent while no event comes)
    ended: str | None = None  # the status it ended with


def _hold(client: Client, after: str) -> Held:
    held = Held()
    stream = client.events.StreamEvents(event_pb2.StreamEventsRequest(types=[TYPES], after_id=after))

    def read() -> None:
        try:
            for event in stream:
                held.received += 1
                if event.type != "heartbeat":
                    held.events.append({"id": event.id, "type": event.type, "execution_id": event.execution_id})
            held.ended = "OK"
        except grpc.RpcError as exc:
            held.ended = exc.code().name  # type: ignore[attr-defined]

    threading.Thread(target=read, daemon=True).start()
    return held


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@dataclass
class Servers:
    """The three servers, by host, and Envoy alone in front of the first two."""

    by_host: dict[str, ServeProcess]
    port: int
    edge: Stack

    def stats(self, host: str, api_key: str = ADMIN_KEY) -> gateway_pb2.Stats:
        """GetStats asked of the server on `host` itself, not through Envoy."""
        with Client(f"{host}:{self.port}", api_key=api_key) as client:
            stats: gateway_pb2.Stats = client.gateway.GetStats(gateway_pb2.GetStatsRequest(), timeout=5)
            return stats

    def upstreams(self, *argv: str) -> str:
        """`flowport upstreams ...` on Envoy's data dir; its output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPORT_")}
        command = [sys.executable, "-m", "flowport.clients.cli", "upstreams", argv[0]]
        command += ["--data-dir", str(self.edge.settings.data_dir), *argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


def _envoy_pid(parent: int) -> int:
    """The Envoy `flowport up` (process `parent`) started: its only child with --no-local-server."""
    children = [
        int(pid) for task in Path(f"/proc/{parent}/task").iterdir() for pid in (task / "children").read_text().split()
    ]
    envoys = [pid for pid in children if b"envoy" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(envoys) == 1, children
    return envoys[0]


@pytest.fixture
def servers(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[Servers]:
    port = free_port()
    by_host = shared_servers(tmp_path, port, postgres_url, redis_url)
    edge_settings = make_settings(
        tmp_path / "edge", no_local_server=True, upstream=f"{REMOVED}:{port},{KEPT}:{port}", websocket_port=0
    )
    edge: Stack | None = None
    try:
        by_host[REMOVED].start()  # alone: it migrates the database
        others = [threading.Thread(target=by_host[h].start) for h in (KEPT, ADDED)]
        for thread in others:
            thread.start()
        for thread in others:
            thread.join()
        assert all(s.process is not None and s.process.poll() is None for s in by_host.values())
        edge = start_up(edge_settings)
        _hosts_healthy(edge_settings.admin_port, 2)
        yield Servers(by_host, port, edge)
    finally:
        if edge is not None:
            stop_up(edge)
        running = [s.process for s in by_host.values() if s.process is not None and s.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGINT)  # no drain, all at once
        for process in running:
            process.wait(30)


def _held_on_both(servers: Servers, watcher: Client, after: str) -> tuple[list[Held], int]:
    """Streams opened through Envoy until each of the first two servers holds one; how many the removed one holds."""
    held: list[Held] = []
    while len(held) < MAX_HELD:
        held.append(_hold(watcher, after))
        _until(
            lambda: sum(servers.stats(h).realtime.grpc_count for h in (REMOVED, KEPT)) == len(held),
            "a stream opened through Envoy reached no server",
        )
        on_removed = servers.stats(REMOVED).realtime.grpc_count
        if 0 < on_removed < len(held):
            return held, on_removed
    raise AssertionError(f"{len(held)} streams all went to one server")


def _add(servers: Servers, admin_port: int, user_key: str) -> None:
    """`flowport upstreams add` the third server, which then takes calls."""
    # Its calls: its figures for the load's tenant (health checks carry no credential,
    # so they are not in them), less the GetStats calls read here, each one call.
    asked = [servers.stats(ADDED, user_key).requests.total]

    def calls_on_added() -> float:
        asked.append(servers.stats(ADDED, user_key).requests.total)
        return asked[-1] - asked[0] - (len(asked) - 1)

    added = servers.upstreams("add", f"{ADDED}:{servers.port}")
    assert f"added: {ADDED}:{servers.port}" in added
    _hosts_healthy(admin_port, 3)
    _until(lambda: calls_on_added() >= 5, "the added server took no calls")
    listed = servers.upstreams("list").splitlines()
    assert [line.split()[0] for line in listed] == [f"{h}:{servers.port}" for h in (REMOVED, KEPT, ADDED)]
    assert all(line.split()[1:] == ["upstream", "healthy"] for line in listed), listed


def _remove_then_stop(servers: Servers, admin_port: int, held: list[Held], on_removed: int) -> None:
    """`flowport upstreams remove` the first server, streams flowing on; then SIGTERM it."""
    received = [h.received for h in held]
    removed = servers.upstreams("remove", f"{REMOVED}:{servers.port}")
    assert f"removed: {REMOVED}:{servers.port}" in removed
    _hosts_healthy(admin_port, 2)
    # Every stream, the removed server's too (Envoy drains its connection), keeps flowing.
    _until(
        lambda: all(h.received > n for h, n in zip(held, received, strict=True)),
        "a stream stopped across the change",
    )
    assert [h.ended for h in held] == [None] * len(held)
    # Out of Envoy's cluster, the removed server stops: its drain ends its streams cleanly.
    stopping = servers.by_host[REMOVED].process
    assert stopping is not None
    stopping.terminate()
    assert stopping.wait(DEFAULT_DRAIN + 20) == 0
    _until(lambda: sum(h.ended is not None for h in held) >= on_removed, "its streams did not end")


@pytest.mark.timeout(120)
def test_upstreams_change_under_load_without_restarting_envoy_or_dropping_a_call(servers: Servers) -> None:
    edge = servers.edge.settings
    base, target = edge.http_url, f"127.0.0.1:{edge.http_port}"
    envoy = _envoy_pid(servers.edge.process.pid)
    start = _prepare(target)
    with Client(target, api_key=ADMIN_KEY) as client:
        made = client.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(roles=["user"])))
    watcher = Client(target, api_key=ADMIN_KEY, retries=1)
    try:
        held, on_removed = _held_on_both(servers, watcher, start)
        load = Load()
        workers = [
            threading.Thread(target=_rest_worker, args=(base, load)),
            threading.Thread(target=_grpc_worker, args=(target, load)),
        ]
        for worker in workers:
            worker.start()
        try:
            time.sleep(1.0)
            _add(servers, edge.admin_port, made.key)
            _remove_then_stop(servers, edge.admin_port, held, on_removed)
        finally:
            load.done.set()
            for worker in workers:
                worker.join(60)

        assert _envoy_pid(servers.edge.process.pid) == envoy  # never restarted
        assert load.failures == [], f"{len(load.failures)} of {sum(load.calls.values())} calls failed"
        assert len(load.executions) >= 10, load.calls
        logged = _logged(target, start, len(load.executions))
        _each_ran_once(target, load, logged)
        ended = [h for h in held if h.ended is not None]
        assert len(ended) == on_removed and {h.ended for h in ended} == {"OK"}
        for stream in ended:
            assert stream.events == logged[: len(stream.events)]
        # The streams on the server that stayed never ended, and saw the whole log, in order.
        kept = [h for h in held if h.ended is None]
        _until(lambda: all(len(h.events) >= len(logged) for h in kept), "a kept stream missed events")
        assert all(h.events == logged for h in kept)
    finally:
        watcher.close()
