"""RateLimitedAPINode against a real HTTP server on 127.0.0.1: concurrent node runs
never exceed the limit in any window (checked on the server's arrival times and on
the limiter's own decisions), tenants have separate limits, two processes sharing
a Redis share one, and 429 answers back off as configured."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from flowport.server.engine.executor import Executor
from flowport.server.engine.plan import PlanCache
from flowport.server.engine.registry import NodeRegistry, builtin_types
from flowport.server.engine.validation import validate
from flowport.server.events.bus import EventBus
from flowport.server.nodes import http as http_nodes
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.rate_limited import RateLimitedAPINode, limit_key
from flowport.server.ratelimit.outbound import (
    STRATEGIES,
    Decision,
    LocalLimiter,
    OutboundLimiter,
    RateLimitConfig,
)
from flowport.server.ratelimit.outbound_redis import RedisLimiter
from flowport.server.storage import SqliteStore
from flowport.v1 import workflow_pb2

from ..backends import RedisServer
from .test_http_nodes import LOOPBACK, Reply, Seen, _json_reply, _Server
from .test_outbound_limiter import assert_within_limit

# What the server sees is what the limiter granted, each a little later: the
# request still has to cross the event loop, a thread pool (address check)
# and the socket. A request delayed more than a later one compresses the
# window it ends, so arrival windows are checked this much shorter. The
# limiter's own decisions are checked exactly.
ARRIVAL_SLACK = 0.5  # a busy 2-core machine has delayed some requests by a few hundred ms, then let them in together


class Recorder(LocalLimiter):
    """A LocalLimiter that keeps the clock reading of every request it let go, and says when it blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.granted: list[float] = []
        self.penalised = asyncio.Event()

    async def decide(self, key: str, config: RateLimitConfig) -> Decision:
        decision = await super().decide(key, config)
        if decision.wait == 0.0:
            self.granted.append(decision.at)
        return decision

    async def penalise(self, key: str, config: RateLimitConfig, retry_after: float | None) -> float:
        block = await super().penalise(key, config, retry_after)
        self.penalised.set()
        return block


class Api(_Server):
    """The test server, with each request's arrival time (time.monotonic)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: dict[str, list[float]] = {}

    def route(self, path: str, answer: Any) -> None:
        def recorded(seen: Seen, n: int) -> Reply:
            with self.lock:
                self.arrivals.setdefault(path, []).append(time.monotonic())
            reply: Reply = answer(seen, n)
            return reply

        self.routes[path] = recorded


@pytest.fixture
def api() -> Iterator[Api]:
    srv = Api()
    srv.route("/ok", lambda seen, n: _json_reply(200, {"n": n}))
    srv.route(
        "/busy-once", lambda seen, n: _json_reply(429, {}, **{"Retry-After": "1"}) if n == 1 else _json_reply(200, {})
    )
    srv.route("/busy-four", lambda seen, n: _json_reply(429, {}) if n <= 4 else _json_reply(200, {}))
    srv.route("/busy", lambda seen, n: _json_reply(429, {}))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as shared:
        yield shared


def make_ctx(
    client: httpx.AsyncClient, limiter: OutboundLimiter | None, *, tenant: str = "t1", timeout: float = 30.0
) -> NodeContext:
    services = NodeServices(http=client, http_allowlist=LOOPBACK, outbound=limiter)
    return NodeContext(
        tenant=tenant, execution_id="exe_1", node_id="call", attempt=1, timeout=timeout, services=services
    )


async def run_node(ctx: NodeContext, **params: Any) -> dict[str, Any]:
    node = RateLimitedAPINode()
    return await node.run(ctx, node.prepare(params), params)


def limit(strategy: str = "sliding_window", **extra: Any) -> dict[str, Any]:
    return {"max_requests": 5, "time_window": 0.5, "strategy": strategy, **extra}


def assert_arrivals_within(arrivals: list[float], config: RateLimitConfig) -> None:
    """The limit on the server's clock, windows shortened by ARRIVAL_SLACK (see above)."""
    times = sorted(arrivals)
    if config.strategy == "token_bucket":
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= config.capacity + config.rate * (times[j] - start + ARRIVAL_SLACK)
        return
    # Fixed windows let up to two windows' worth through around an edge.
    allowed = config.max_requests * (2 if config.strategy == "fixed_window" else 1)
    for j, end in enumerate(times):
        assert sum(1 for t in times[: j + 1] if t > end - (config.time_window - ARRIVAL_SLACK)) <= allowed


# -- the limit holds ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_concurrent_runs_never_exceed_the_limit(api: Api, client: httpx.AsyncClient, strategy: str) -> None:
    limiter = Recorder()
    ctx = make_ctx(client, limiter)
    outs = await asyncio.gather(*(run_node(ctx, url=api.url("/ok"), rate_limit=limit(strategy)) for _ in range(30)))

    assert all(out["success"] for out in outs)
    config = RateLimitConfig.from_mapping(limit(strategy))
    assert_within_limit(limiter.granted, config)
    arrivals = api.arrivals["/ok"]
    assert len(arrivals) == len(limiter.granted) == 30
    assert_arrivals_within(arrivals, config)
    # 30 requests at 5 per 0.5 s cannot arrive faster than this (less the slack).
    first_burst = config.capacity if strategy == "token_bucket" else config.max_requests
    floor = {
        "token_bucket": (30 - first_burst) / config.rate,
        "sliding_window": 5 * config.time_window,
        # The first aligned window may be nearly over when the first 5 go.
        "fixed_window": 4 * config.time_window,
    }[strategy]
    assert max(arrivals) - min(arrivals) >= floor - ARRIVAL_SLACK
    waited = [out["rate_limit"]["waited"] for out in outs]
    # Those past the first burst report their wait. Not exactly 30 - first_burst: on a
    # loaded machine a window edge (or a refill) can pass while the 30 first ask, and a
    # second burst then goes without waiting.
    assert sum(1 for w in waited if w > 0) >= 30 - 2 * first_burst
    assert all(out["rate_limit"]["backoffs"] == 0 for out in outs)


async def test_concurrent_executions_through_the_executor(api: Api, client: httpx.AsyncClient, tmp_path: Path) -> None:
    # The engine's path: config from a protobuf Struct (every number a double), outputs stored as JSON.
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    services = NodeServices(http=client, http_allowlist=LOOPBACK, outbound=LocalLimiter())
    executor = Executor(store, PlanCache(NodeRegistry.default()), EventBus(), services, max_concurrent=12)
    rate_limit = limit("token_bucket", burst_limit=2)
    config = {"url": api.url("/ok"), "rate_limit": rate_limit}
    workflow = json_format.ParseDict(
        {"name": "limited", "nodes": [{"type": "RateLimitedAPINode", "name": "call", "config": config}]},
        workflow_pb2.Workflow(),
    )
    workflow.workflow_id, workflow.version, workflow.tenant = "limited", 1, "t1"
    try:
        created = [
            (await executor.create("t1", workflow, Struct(), session_id="", request_id="", request_hash=None))[0]
            for _ in range(12)
        ]
        done = [await executor.wait("t1", execution.execution_id, 30) for execution in created]
    finally:
        await executor.shutdown()
        await store.close()
    outputs = [json_format.MessageToDict(execution.outputs)["call"] for execution in done if execution is not None]
    assert len(outputs) == 12 and all(out["success"] for out in outputs)
    assert sum(1 for out in outputs if out["rate_limit"]["waited"] > 0) >= 10
    assert_arrivals_within(api.arrivals["/ok"], RateLimitConfig.from_mapping(rate_limit))


async def test_tenants_have_separate_limits(api: Api, client: httpx.AsyncClient) -> None:
    limiter = LocalLimiter()
    slow = limit(max_requests=3, time_window=60)
    acme = make_ctx(client, limiter, tenant="acme")
    for _ in range(3):
        assert (await run_node(acme, url=api.url("/ok"), rate_limit=slow))["rate_limit"]["waited"] == 0
    with pytest.raises(NodeError) as caught:
        await run_node(acme, url=api.url("/ok"), rate_limit=slow, max_wait=0.1)
    assert caught.value.reason == "RATE_LIMITED"
    # Another tenant calling the same target is not held back by acme's calls.
    globex = make_ctx(client, limiter, tenant="globex")
    out = await run_node(globex, url=api.url("/ok"), rate_limit=slow)
    assert out["success"] and out["rate_limit"]["waited"] == 0
    # Nor is acme calling another origin (localhost is another origin than 127.0.0.1).
    other = await run_node(acme, url=api.url("/ok").replace("127.0.0.1", "localhost"), rate_limit=slow)
    assert other["rate_limit"]["waited"] == 0


async def test_two_processes_sharing_redis_share_the_limit(api: Api, redis_url: str) -> None:
    config = limit("sliding_window")
    limiters = [RedisLimiter(redis_url), RedisLimiter(redis_url)]
    clients = [httpx.AsyncClient(), httpx.AsyncClient()]
    try:
        contexts = [make_ctx(c, limiter) for c, limiter in zip(clients, limiters, strict=True)]
        outs = await asyncio.gather(
            *(run_node(contexts[n % 2], url=api.url("/ok"), rate_limit=config) for n in range(20))
        )
    finally:
        for limiter in limiters:
            await limiter.close()
        for c in clients:
            await c.aclose()
    assert all(out["success"] for out in outs)
    arrivals = api.arrivals["/ok"]
    assert len(arrivals) == 20
    assert_arrivals_within(arrivals, RateLimitConfig.from_mapping(config))
    assert max(arrivals) - min(arrivals) >= 3 * 0.5 - ARRIVAL_SLACK


# -- 429 ------------------------------------------------------------------------------


async def test_429_with_retry_after_waits_then_succeeds(api: Api, client: httpx.AsyncClient) -> None:
    limiter = Recorder()
    ctx = make_ctx(client, limiter)
    config = limit(max_requests=100, time_window=1, initial_backoff=0.1)
    first = asyncio.create_task(run_node(ctx, url=api.url("/busy-once"), rate_limit=config, retry_attempts=2))
    await limiter.penalised.wait()
    # Started while the target's Retry-After holds: held back too, though it never saw a 429.
    second = await run_node(ctx, url=api.url("/ok"), rate_limit=config)
    out = await first

    assert out["success"] and out["status_code"] == 200
    assert out["response"]["attempts"] == 2
    assert out["rate_limit"]["backoffs"] == 1
    busy = api.arrivals["/busy-once"]
    assert busy[1] - busy[0] >= 1.0
    assert second["success"] and second["rate_limit"]["waited"] > 0
    assert api.arrivals["/ok"][0] - busy[0] >= 1.0


async def test_429_backs_off_by_factor_up_to_max_backoff(
    api: Api, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []

    async def recording_sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(delay)

    monkeypatch.setattr(http_nodes, "_sleep", recording_sleep)
    config = limit(max_requests=100, time_window=1, initial_backoff=0.05, backoff_factor=2, max_backoff=0.15)
    out = await run_node(
        make_ctx(client, LocalLimiter()), url=api.url("/busy-four"), rate_limit=config, retry_attempts=5
    )

    assert out["success"] and out["response"]["attempts"] == 5
    assert out["rate_limit"]["backoffs"] == 4
    # initial_backoff * factor**n, capped; no jitter, no retry_delay.
    assert delays == pytest.approx([0.05, 0.1, 0.15, 0.15])
    arrivals = api.arrivals["/busy-four"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=True))


async def test_429_without_retries_left_is_returned_and_blocks_the_target(api: Api, client: httpx.AsyncClient) -> None:
    limiter = LocalLimiter()
    ctx = make_ctx(client, limiter)
    config = limit(max_requests=100, time_window=1, initial_backoff=30)
    out = await run_node(ctx, url=api.url("/busy"), rate_limit=config)
    assert out["success"] is False and out["status_code"] == 429
    assert out["rate_limit"] == {"waited": 0.0, "backoffs": 1}
    # The next call to that target waits out the backoff, which is longer than it may wait.
    with pytest.raises(NodeError) as caught:
        await run_node(ctx, url=api.url("/ok"), rate_limit=config, max_wait=1)
    assert caught.value.reason == "RATE_LIMITED" and caught.value.retryable
    assert caught.value.retry_after is not None and 29 < caught.value.retry_after <= 30
    assert "/ok" not in api.arrivals


async def test_a_429_block_longer_than_the_time_left_returns_the_429(api: Api, client: httpx.AsyncClient) -> None:
    ctx = make_ctx(client, LocalLimiter(), timeout=2.0)
    out = await run_node(
        ctx, url=api.url("/busy"), rate_limit=limit(initial_backoff=30, max_requests=100), retry_attempts=3
    )
    assert out["status_code"] == 429 and out["response"]["attempts"] == 1


# -- no slot in time -----------------------------------------------------------------


async def test_rate_limited_when_max_wait_is_too_short(api: Api, client: httpx.AsyncClient) -> None:
    ctx = make_ctx(client, LocalLimiter())
    config = limit(max_requests=1, time_window=5)
    assert (await run_node(ctx, url=api.url("/ok"), rate_limit=config))["success"]
    started = time.monotonic()
    with pytest.raises(NodeError) as caught:
        await run_node(ctx, url=api.url("/ok"), rate_limit=config, max_wait=0.2)
    error = caught.value
    assert error.reason == "RATE_LIMITED" and error.retryable
    assert error.retry_after is not None and 4 < error.retry_after <= 5
    assert "127.0.0.1" in error.message
    # It does not sit out a wait it cannot afford.
    assert time.monotonic() - started < 4
    assert len(api.arrivals["/ok"]) == 1


async def test_rate_limited_when_the_node_deadline_comes_first(api: Api, client: httpx.AsyncClient) -> None:
    limiter = LocalLimiter()
    config = limit(max_requests=1, time_window=5)
    await run_node(make_ctx(client, limiter), url=api.url("/ok"), rate_limit=config)
    with pytest.raises(NodeError) as caught:
        await run_node(make_ctx(client, limiter, timeout=1.0), url=api.url("/ok"), rate_limit=config)
    assert caught.value.reason == "RATE_LIMITED"


async def test_a_short_wait_is_waited(api: Api, client: httpx.AsyncClient) -> None:
    ctx = make_ctx(client, LocalLimiter())
    config = limit(max_requests=1, time_window=0.3)
    await run_node(ctx, url=api.url("/ok"), rate_limit=config)
    out = await run_node(ctx, url=api.url("/ok"), rate_limit=config, max_wait=1)
    assert out["success"] and 0 < out["rate_limit"]["waited"] <= 0.3
    first, second = api.arrivals["/ok"]
    assert second - first >= 0.3 - ARRIVAL_SLACK


# -- failures -----------------------------------------------------------------------


async def test_redis_gone_fails_retryably_and_sends_nothing(
    api: Api, client: httpx.AsyncClient, redis_server: RedisServer, redis_url: str
) -> None:
    limiter = RedisLimiter(redis_url, timeout=0.5)
    try:
        redis_server.stop()
        with pytest.raises(NodeError) as caught:
            await run_node(make_ctx(client, limiter), url=api.url("/ok"), rate_limit=limit())
    finally:
        redis_server.start()
        await limiter.close()
    assert caught.value.reason == "RATE_LIMITER_UNAVAILABLE" and caught.value.retryable
    assert "Redis" in caught.value.message
    assert "/ok" not in api.arrivals


async def test_no_limiter_configured(api: Api, client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run_node(make_ctx(client, None), url=api.url("/ok"), rate_limit=limit())
    assert caught.value.reason == "RATE_LIMITER_UNAVAILABLE"


async def test_a_bad_rate_limit_from_a_connection_is_refused(api: Api, client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run_node(make_ctx(client, LocalLimiter()), url=api.url("/ok"), rate_limit={"max_requests": 0})
    assert caught.value.reason == "INVALID_PARAMETER"
    assert "rate_limit" in caught.value.message


# -- schema and metadata ------------------------------------------------------------


def test_config_validation_with_field_paths() -> None:
    seed = {
        "url": "https://api.external-service.com/data",
        "method": "GET",
        "retry_attempts": 3,
        "rate_limit": {
            "max_requests": 100,
            "time_window": 60.0,
            "strategy": "token_bucket",
            "burst_limit": 150,
            "backoff_factor": 1.5,
            "max_backoff": 300.0,
        },
    }
    assert RateLimitedAPINode.validate_config(seed, "nodes[0].config") == []

    def problems(**changes: Any) -> list[str]:
        config = {**seed, "rate_limit": {**seed["rate_limit"], **changes}}  # type: ignore[dict-item]
        return [path for path, _ in RateLimitedAPINode.validate_config(config, "nodes[0].config")]

    assert problems(max_requests=0) == ["nodes[0].config.rate_limit.max_requests"]
    assert problems(time_window=0) == ["nodes[0].config.rate_limit.time_window"]
    assert problems(strategy="leaky_bucket") == ["nodes[0].config.rate_limit.strategy"]
    assert problems(burst_limit=0) == ["nodes[0].config.rate_limit.burst_limit"]
    assert problems(backoff_factor=0.5) == ["nodes[0].config.rate_limit.backoff_factor"]
    assert problems(max_backoff=-1) == ["nodes[0].config.rate_limit.max_backoff"]
    assert problems(initial_backoff=-1) == ["nodes[0].config.rate_limit.initial_backoff"]
    assert problems(burst=5) == ["nodes[0].config.rate_limit"]
    missing = RateLimitedAPINode.validate_config({"url": "https://x"}, "nodes[0].config")
    assert [path for path, _ in missing] == ["nodes[0].config.rate_limit"]
    no_max = RateLimitedAPINode.validate_config({"url": "https://x", "rate_limit": {"time_window": 1}}, "n")
    assert [path for path, _ in no_max] == ["n.rate_limit.max_requests"]
    negative = RateLimitedAPINode.validate_config({**seed, "max_wait": -1}, "n")
    assert [path for path, _ in negative] == ["n.max_wait"]


def test_a_workflow_with_a_bad_rate_limit_is_refused_with_the_path() -> None:
    data = {
        "name": "w",
        "nodes": [
            {
                "type": "RateLimitedAPINode",
                "name": "call",
                "config": {"url": "https://api.example.com", "rate_limit": {"max_requests": 0, "time_window": 1}},
            }
        ],
    }
    problems = validate(json_format.ParseDict(data, workflow_pb2.Workflow()), NodeRegistry.default())
    assert [path for path, _ in problems] == ["nodes[0].config.rate_limit.max_requests"]


def test_metadata_and_registration() -> None:
    assert RateLimitedAPINode in builtin_types()
    assert set(RateLimitedAPINode.output_names()) == {"response", "result", "status_code", "success", "rate_limit"}
    assert RateLimitedAPINode.is_retry_safe({"method": "GET"}) and not RateLimitedAPINode.is_retry_safe(
        {"method": "POST"}
    )
    assert RateLimitedAPINode.retry_safe is False
    assert {"url", "rate_limit", "max_wait"} <= set(RateLimitedAPINode.input_names())


def test_the_limit_key_is_tenant_and_origin() -> None:
    assert limit_key("acme", "https://API.example.com/v1/data?page=2") == "acme:https://api.example.com:443"
    assert limit_key("acme", "http://api.example.com/") == "acme:http://api.example.com:80"
    assert limit_key("acme", "http://api.example.com:8080/x") == "acme:http://api.example.com:8080"
    assert limit_key("acme", "http://user:pw@[::1]:81/") == "acme:http://[::1]:81"
